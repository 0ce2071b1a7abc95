#!/usr/bin/env python3
"""The application-data record path (qkdproxy/core/tls/records.py open_records).

The input is what arrives after the handshake, opened with fixed traffic keys (byte 0 odd:
ChaCha20-Poly1305, else AES-GCM). Whatever is opened must be whole records from the start
of the buffer, one sequence number each; nothing may raise.
"""

from __future__ import annotations

from dataclasses import dataclass

import fuzzlib
from fuzzlib import atheris

with atheris.instrument_imports(include=fuzzlib.INSTRUMENTED):
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

    from qkdproxy.core.tls.records import HEADER, MAX_PLAINTEXT, TrafficKeys, open_records, seal

KEY, IV = bytes(range(32)), int.from_bytes(bytes(range(100, 112)), "big")


@dataclass
class Counter:
    seqnum: int = 0


def keys(chacha: bool) -> TrafficKeys:
    return TrafficKeys(ChaCha20Poly1305(KEY) if chacha else AESGCM(KEY), IV, Counter())


def test_one_input(data: bytes) -> None:
    if not data:
        return
    receiver = keys(bool(data[0] & 1))
    buffer = data[1:]
    opened = open_records(receiver, buffer)
    assert receiver.state.seqnum == len(opened.data)
    assert 0 <= opened.consumed <= len(buffer)
    pos = 0
    for content in opened.data:
        length = HEADER.unpack_from(buffer, pos)[2]
        assert len(content) <= MAX_PLAINTEXT
        pos += HEADER.size + length
    assert pos == opened.consumed, "consumed is not a whole number of records"


def seeds() -> list[bytes]:
    out = []
    for chacha in (False, True):
        sender = keys(chacha)
        wire = seal(sender, b"hello") + seal(sender, bytes(300)) + seal(sender, b"x" * 20000)
        out.append(bytes([chacha]) + wire)
    return out


if __name__ == "__main__":
    fuzzlib.run(test_one_input, seeds())
