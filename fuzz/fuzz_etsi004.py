#!/usr/bin/env python3
"""ETSI GS QKD 004 frames (qkdproxy/core/etsi004/codec.py: decode and FrameDecoder).

Byte 0 is the chunk size; the rest one stream of frames. Anything decoded must re-encode
to exactly the bytes it came from (strict, canonical), the decoder must buffer at most one
frame and stay failed after an error, and nothing but CodecError may be raised.
"""

from __future__ import annotations

import contextlib
import uuid

import fuzzlib
from fuzzlib import atheris

with atheris.instrument_imports(include=fuzzlib.INSTRUMENTED):
    from qkdproxy.core.etsi004.codec import (
        HEADER_SIZE,
        CloseRequest,
        CloseResponse,
        CloseServer,
        CodecError,
        ErrorFrame,
        FrameDecoder,
        GetKeyRequest,
        GetKeyResponse,
        Message,
        OpenConnectRequest,
        OpenConnectResponse,
        QoS,
        Status,
        decode,
        encode,
    )

MAX_PAYLOAD = 4096


def test_one_input(data: bytes) -> None:
    if not data:
        return
    size, wire = data[0] + 1, data[1:]
    with contextlib.suppress(CodecError):
        assert encode(decode(wire, MAX_PAYLOAD)) == wire, "accepted a non-canonical frame"
    decoder, messages, failed = FrameDecoder(MAX_PAYLOAD), list[Message](), False
    for start in range(0, len(wire), size):
        try:
            decoder.feed(wire[start : start + size])
            while (message := decoder.next_message()) is not None:
                messages.append(message)
        except CodecError:
            failed = True
            break
        assert decoder.buffered < HEADER_SIZE + MAX_PAYLOAD + size
    if failed:
        try:
            decoder.next_message()
        except CodecError:
            pass
        else:
            raise AssertionError("the decoder recovered after an error")
    assert wire.startswith(b"".join(encode(m) for m in messages))


def seeds() -> list[bytes]:
    ksid, qos = uuid.UUID(int=7).bytes, QoS(32, timeout_ms=1000, ttl_s=600)
    messages: list[Message] = [
        OpenConnectRequest("alice", "bob", qos, ksid),
        OpenConnectResponse(Status.SUCCESS, qos, ksid),
        GetKeyRequest(ksid, 0, 1024),
        GetKeyResponse(Status.SUCCESS, 0, bytes(32), b'{"index":0}'),
        GetKeyResponse(Status.METADATA_TOO_SMALL, 0, metadata_needed=64),
        CloseRequest(ksid),
        CloseResponse(Status.SUCCESS),
        ErrorFrame(),
        CloseServer(),
    ]
    return [b"\xff" + encode(m) for m in messages] + [
        b"\x03" + b"".join(encode(m) for m in messages)
    ]


if __name__ == "__main__":
    fuzzlib.run(test_one_input, seeds())
