#!/usr/bin/env python3
"""Key announcements end to end: qkdproxy/1 frames through PeerChannel.receive
(qkdproxy/io/peer_channel.py) into AnnouncedSlave (qkdproxy/keys/announce.py).

Byte 0 is the read size; the rest is what the peer sends inside the tunnel. The channel
must return DATA only, raise nothing but TlsStreamError, and the announced-key cache must
hand each key out at most once however ids are announced (repeated, unknown, after use).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import cast

import fuzzlib
from fuzzlib import atheris

with atheris.instrument_imports(include=fuzzlib.INSTRUMENTED):
    from qkdproxy.core.keys import KeyNotFoundError, QkdKey, QkdKeyError
    from qkdproxy.core.peer.frames import FrameType, encode, encode_key_ids
    from qkdproxy.io.peer_channel import PeerChannel
    from qkdproxy.io.tls_stream import TlsStream, TlsStreamError
    from qkdproxy.keys.announce import AnnouncedSlave
    from qkdproxy.keys.sources import KeySources

KNOWN = [bytes([i]) * 16 for i in range(1, 6)]
LOOP = asyncio.new_event_loop()


class OnceKme:
    """Each known key once, then never again."""

    def __init__(self) -> None:
        self.keys = {k: os.urandom(32) for k in KNOWN}

    async def get_key(self, key_id: bytes) -> QkdKey:
        await asyncio.sleep(0)
        material = self.keys.pop(bytes(key_id), None)
        if material is None:
            raise KeyNotFoundError("unknown or already delivered")
        return QkdKey(bytes(key_id), material)


class FakeStream:
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = [c for c in chunks if c]
        self.closed = False

    async def read(self) -> bytes:
        return self.chunks.pop(0) if self.chunks else b""

    async def write(self, data: bytes) -> None:
        pass

    async def close(self) -> None:
        self.closed = True


async def session(chunks: list[bytes]) -> None:
    slave = AnnouncedSlave(OnceKme(), max_keys=4)
    stream = FakeStream(chunks)
    channel = PeerChannel(cast(TlsStream, stream), KeySources(slave=slave))
    try:
        while await channel.receive():
            pass
    except TlsStreamError:
        assert stream.closed
    handed: list[bytes] = []
    for key_id in [*KNOWN, *KNOWN]:  # every known id, asked for twice
        with contextlib.suppress(QkdKeyError):
            handed.append((await slave.get_key(key_id)).key_id)
    await slave.aclose()
    assert len(handed) == len(set(handed)), "a key was handed out twice"


def test_one_input(data: bytes) -> None:
    if not data:
        return
    size, wire = data[0] + 1, data[1:]
    LOOP.run_until_complete(session([wire[i : i + size] for i in range(0, len(wire), size)]))


def seeds() -> list[bytes]:
    stream = (
        encode_key_ids(KNOWN[:3])
        + encode(FrameType.DATA, b"hello")
        + encode_key_ids([KNOWN[0], b"\x99" * 16])
        + encode(FrameType.FIN)
    )
    return [b"\xff" + stream, b"\x06" + stream]


if __name__ == "__main__":
    fuzzlib.run(test_one_input, seeds())
