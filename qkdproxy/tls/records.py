"""TLS 1.3 application-data records (RFC 8446 5.2 and 5.3), without I/O.

After the handshake almost every record carries application data. tlslite handles each one
through several layers of pure-Python parsing, which caps a tunnel at a fraction of what
the AEAD can do; this module seals and opens those records directly with the connection's
traffic keys. Anything else (KeyUpdate, NewSessionTicket, alerts, malformed or
undecryptable records) is left untouched for tlslite, which owns the protocol state and
the right alert for every error. The sequence numbers live in tlslite's connection state,
so both paths always agree on the next nonce.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

APPLICATION_DATA = 0x17
LEGACY_VERSION = 0x0303
HEADER = struct.Struct("!BHH")
MAX_PLAINTEXT = 1 << 14
# RFC 8446 5.2: the encrypted record may exceed the plaintext limit by at most 256 bytes.
MAX_CIPHERTEXT = MAX_PLAINTEXT + 256
TAG_LENGTH = 16
_INNER_TYPE = bytes([APPLICATION_DATA])


class SequenceState(Protocol):
    """Where the record sequence number of one direction is kept (tlslite's state)."""

    seqnum: int


@dataclass(frozen=True, slots=True)
class TrafficKeys:
    """One direction's record protection: its AEAD, static IV and sequence counter."""

    aead: AESGCM | ChaCha20Poly1305
    iv: int
    state: SequenceState

    def nonce(self) -> bytes:
        """The per-record nonce: the IV xor the 64-bit sequence number (RFC 8446 5.3)."""
        return (self.iv ^ self.state.seqnum).to_bytes(12, "big")


def seal(keys: TrafficKeys, plaintext: bytes | memoryview) -> bytes:
    """Protect ``plaintext`` as application-data records of at most 16 KiB each."""
    view = memoryview(plaintext)
    out = bytearray()
    for start in range(0, len(view), MAX_PLAINTEXT):
        inner = bytes(view[start : start + MAX_PLAINTEXT]) + _INNER_TYPE
        header = HEADER.pack(APPLICATION_DATA, LEGACY_VERSION, len(inner) + TAG_LENGTH)
        out += header
        out += keys.aead.encrypt(keys.nonce(), inner, header)
        keys.state.seqnum += 1
    return bytes(out)


@dataclass(slots=True)
class Opened:
    """What :func:`open_records` found at the front of a buffer."""

    data: list[bytes] = field(default_factory=list)
    # Bytes of the buffer that held the records in ``data``.
    consumed: int = 0
    # The next record is not plain application data: tlslite must read it.
    handoff: bool = False


def open_records(keys: TrafficKeys, buffer: bytes | bytearray | memoryview) -> Opened:
    """Open the complete application-data records at the front of ``buffer``.

    Stops at an incomplete record (more bytes needed) or at the first record that is
    anything but well-formed application data (``handoff``), leaving it and its sequence
    number to tlslite.
    """
    view = memoryview(buffer)
    opened = Opened()
    pos = 0
    while len(view) - pos >= HEADER.size:
        kind, version, length = HEADER.unpack_from(view, pos)
        if (
            kind != APPLICATION_DATA
            or version != LEGACY_VERSION
            or not TAG_LENGTH < length <= MAX_CIPHERTEXT
        ):
            opened.handoff = True
            break
        end = pos + HEADER.size + length
        if end > len(view):
            break
        content = _open_one(keys, view[pos : pos + HEADER.size], view[pos + HEADER.size : end])
        if content is None:
            opened.handoff = True
            break
        opened.data.append(content)
        keys.state.seqnum += 1
        pos = end
    opened.consumed = pos
    return opened


def _open_one(keys: TrafficKeys, header: memoryview, body: memoryview) -> bytes | None:
    """The content of one application-data record; None for anything tlslite must see."""
    try:
        inner = keys.aead.decrypt(keys.nonce(), body, header)
    except InvalidTag:
        return None
    # RFC 8446 5.4 bounds the whole TLSInnerPlaintext, padding included.
    if len(inner) > MAX_PLAINTEXT + 1:
        return None
    content = inner.rstrip(b"\0")
    if not content or content[-1] != APPLICATION_DATA:
        return None
    return content[:-1]


def is_protected(buffer: bytes | bytearray | memoryview) -> bool:
    """True unless the next record's outer type says it was sent unencrypted.

    After the handshake every record is protected and carries the outer type 0x17
    (RFC 8446 5.2); tlslite would still take a plaintext alert while a sequence number is
    0, which lets anyone on path end a stream as if the peer had closed it.
    """
    return not buffer or buffer[0] == APPLICATION_DATA
