#!/usr/bin/env python3
"""qkdproxy/1 framing (qkdproxy/core/peer/frames.py FrameDecoder, KEY_IDS/KSIDS payloads).

Byte 0 is the chunk size; the rest the stream. Decoding in chunks must give the frames a
byte-by-byte decode gives, fail exactly when it fails, never buffer past one frame, and
raise nothing but FrameError.
"""

from __future__ import annotations

import fuzzlib
from fuzzlib import atheris

with atheris.instrument_imports(include=fuzzlib.INSTRUMENTED):
    from qkdproxy.core.peer.frames import (
        HEADER_SIZE,
        MAX_PAYLOAD,
        Frame,
        FrameDecoder,
        FrameError,
        FrameType,
        encode,
        encode_key_ids,
    )


def decode(chunks: list[bytes]) -> tuple[list[Frame], bool]:
    decoder, frames = FrameDecoder(), list[Frame]()
    for chunk in chunks:
        try:
            frames += decoder.feed(chunk)
        except FrameError:
            return frames, True
        assert decoder.pending <= HEADER_SIZE + MAX_PAYLOAD
    return frames, False


def test_one_input(data: bytes) -> None:
    if not data:
        return
    size, wire = data[0] + 1, data[1:]
    frames, broken = decode([wire[i : i + size] for i in range(0, len(wire), size)])
    reference, reference_broken = decode([wire[i : i + 1] for i in range(len(wire))])
    assert broken == reference_broken
    assert frames == reference[: len(frames)]
    assert broken or frames == reference
    for frame in frames:
        if frame.type in (FrameType.KEY_IDS, FrameType.KSIDS):
            assert b"".join(frame.key_ids()) == frame.payload
            assert frame.payload
        if frame.type is FrameType.FIN:
            assert not frame.payload


def seeds() -> list[bytes]:
    ids = [bytes([i]) * 16 for i in range(3)]
    stream = (
        encode_key_ids(ids)
        + encode_key_ids(ids[:1], FrameType.KSIDS)
        + encode(FrameType.DATA, b"payload")
        + encode(FrameType.FIN)
    )
    return [b"\xff" + stream, b"\x00" + stream]


if __name__ == "__main__":
    fuzzlib.run(test_one_input, seeds())
