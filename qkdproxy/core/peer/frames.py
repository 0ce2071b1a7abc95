"""Framing between two qkdproxy peers (ALPN ``qkdproxy/1``), without I/O.

    frame = type (1 byte) || payload length (3 bytes, big-endian) || payload

DATA carries application bytes, FIN ends one direction (TLS has no half-close), KEY_IDS
announces ETSI 014 key ids the sender's master side will use next, and KSIDS announces ETSI
004 streams the sender opened ahead, so the receiver can fetch keys before a handshake
needs them. PROBE (from a client, no payload) asks the server for its VERDICT: a short
UTF-8 text, ``ok`` once the backend is connected, else why the server gives up (sent
before it closes, asked or not, so ``qkdproxy probe`` learns why).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

ALPN_PROTOCOL = "qkdproxy/1"
# Application connections as HTTP/2 CONNECT streams in one tunnel (tunnel/mux.py).
MUX_ALPN_PROTOCOL = "qkdproxy-mux/1"
HEADER_SIZE = 4
MAX_PAYLOAD = 16384 - HEADER_SIZE
KEY_ID_SIZE = 16
MAX_ANNOUNCED_IDS = MAX_PAYLOAD // KEY_ID_SIZE


class FrameType(IntEnum):
    """Frame types of ``qkdproxy/1``."""

    DATA = 0x00
    FIN = 0x01
    KEY_IDS = 0x10
    KSIDS = 0x11
    PROBE = 0x20
    VERDICT = 0x21


VERDICT_OK = "ok"
# A verdict is a reason for an operator, not a payload: bounded well below one frame.
MAX_VERDICT = 512


class FrameError(ValueError):
    """The peer broke the framing; the connection must be closed."""


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame."""

    type: FrameType
    # DATA: a view of the bytes fed to the decoder (no copy); every other type: bytes.
    payload: bytes | memoryview

    def key_ids(self) -> list[bytes]:
        """The ids of a KEY_IDS frame."""
        ids = bytes(self.payload)
        return [ids[i : i + KEY_ID_SIZE] for i in range(0, len(ids), KEY_ID_SIZE)]


def encode(frame_type: FrameType, payload: bytes = b"") -> bytes:
    """One frame on the wire."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"frame payload over {MAX_PAYLOAD} bytes")
    return bytes([frame_type]) + len(payload).to_bytes(3, "big") + payload


def encode_data(data: bytes | bytearray | memoryview) -> bytearray:
    """DATA frames for ``data``, at most one TLS record each, in one buffer (each byte of
    ``data`` copied once)."""
    view = memoryview(data)
    size = len(view)
    out = bytearray(size + -(-size // MAX_PAYLOAD) * HEADER_SIZE)
    pos = 0
    for start in range(0, size, MAX_PAYLOAD):
        chunk = view[start : start + MAX_PAYLOAD]
        out[pos : pos + HEADER_SIZE] = _DATA_TYPE + len(chunk).to_bytes(3, "big")
        pos += HEADER_SIZE
        out[pos : pos + len(chunk)] = chunk
        pos += len(chunk)
    return out


def encode_key_ids(key_ids: Sequence[bytes], frame_type: FrameType = FrameType.KEY_IDS) -> bytes:
    """A KEY_IDS (or KSIDS) frame."""
    if not key_ids or len(key_ids) > MAX_ANNOUNCED_IDS:
        raise ValueError(f"announce 1..{MAX_ANNOUNCED_IDS} key ids")
    if any(len(k) != KEY_ID_SIZE for k in key_ids):
        raise ValueError("key ids are 16 bytes")
    return encode(frame_type, b"".join(key_ids))


def encode_verdict(text: str) -> bytes:
    """A VERDICT frame: ``text`` as UTF-8, cut to :data:`MAX_VERDICT` bytes."""
    return encode(FrameType.VERDICT, text.encode()[:MAX_VERDICT])


def decode_verdict(payload: bytes) -> str:
    """The text of a VERDICT frame, safe to print: undecodable bytes and control
    characters are replaced (the peer is authenticated but still not trusted)."""
    text = payload.decode("utf-8", errors="replace")
    return "".join(c if c.isprintable() else "?" for c in text)


class FrameDecoder:
    """Turns a byte stream into frames; raises :class:`FrameError` on any violation."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Add bytes; return the frames completed by them.

        Frames are cut straight out of ``data`` when no partial frame waits (the usual
        case), and only an incomplete tail is kept. DATA payloads are views of ``data`` (or
        of the decoder's own buffer, which it never changes afterwards): ``data`` must not
        change while they are in use.
        """
        return self._cut(data, None)

    def feed_data(
        self, data: bytes | bytearray | memoryview
    ) -> tuple[list[memoryview], list[Frame]]:
        """Like :meth:`feed`, for a receiver that wants the application bytes: the
        payloads of the DATA frames that come before any other frame of ``data``, as views
        (empty ones dropped), then every frame from the first other one on, in order.

        The bulk of a stream is DATA frames only: they cost no frame object each.
        """
        payloads: list[memoryview] = []
        return payloads, self._cut(data, payloads)

    def _cut(
        self, data: bytes | bytearray | memoryview, payloads: list[memoryview] | None
    ) -> list[Frame]:
        if self._buffer:
            self._buffer += data
            data, self._buffer = self._buffer, bytearray()
        view = memoryview(data)
        frames: list[Frame] = []
        pos, size = 0, len(view)
        unpack = _WORD.unpack_from
        try:
            while size - pos >= HEADER_SIZE:
                # The type byte and the 24-bit length, read as one word.
                (word,) = unpack(view, pos)
                length = word & _LENGTH_MASK
                if length > MAX_PAYLOAD:
                    raise FrameError("frame longer than allowed")
                end = pos + HEADER_SIZE + length
                if end > size:
                    break
                type_byte = word >> 24
                # DATA is nearly every frame: skip the checks only other types need.
                if type_byte == FrameType.DATA:
                    if payloads is None or frames:
                        frames.append(Frame(FrameType.DATA, view[pos + HEADER_SIZE : end]))
                    elif length:
                        payloads.append(view[pos + HEADER_SIZE : end])
                else:
                    frames.append(_frame(type_byte, bytes(view[pos + HEADER_SIZE : end])))
                pos = end
            self._buffer += view[pos:]
        finally:
            view.release()
        return frames

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame."""
        return len(self._buffer)


def _frame(type_byte: int, payload: bytes) -> Frame:
    try:
        frame_type = FrameType(type_byte)
    except ValueError:
        raise FrameError(f"unknown frame type {type_byte:#04x}") from None
    if frame_type in (FrameType.FIN, FrameType.PROBE) and payload:
        raise FrameError(f"{frame_type.name} carries no payload")
    if frame_type is FrameType.VERDICT and not 0 < len(payload) <= MAX_VERDICT:
        raise FrameError(f"VERDICT carries 1..{MAX_VERDICT} bytes")
    if frame_type in (FrameType.KEY_IDS, FrameType.KSIDS) and (
        not payload or len(payload) % KEY_ID_SIZE
    ):
        raise FrameError(f"{frame_type.name} payload must be a non-empty list of 16-byte ids")
    return Frame(frame_type, payload)


_DATA_TYPE = bytes([FrameType.DATA])
# A frame header as one big-endian word: the type in the top byte, then the length.
_WORD = struct.Struct("!I")
_LENGTH_MASK = (1 << 24) - 1
