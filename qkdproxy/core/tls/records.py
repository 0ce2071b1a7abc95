"""TLS 1.3 protected records (RFC 8446 5.2 to 5.4), without I/O.

After the handshake almost every record carries application data, so
:func:`open_records` opens runs of them in one tight loop and stops at anything else;
:func:`open_record` then opens that one record whatever its inner type, or names the alert
that refuses it. :mod:`qkdproxy.core.tls.record_layer` builds the post-handshake protocol on
these two.
"""

from __future__ import annotations

import hmac
import struct
import sys
from dataclasses import dataclass, field
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from qkdproxy.core.errors import RemoteProtocolError
from qkdproxy.core.tls.wire import Alert

APPLICATION_DATA = 0x17
LEGACY_VERSION = 0x0303
HEADER = struct.Struct("!BHH")
# A qkdproxy/1 frame header (type byte, 24-bit length) as one big-endian word.
FRAME_HEADER = struct.Struct("!I")
MAX_PLAINTEXT = 1 << 14
# RFC 8446 5.2: the encrypted record may exceed the plaintext limit by at most 256 bytes.
MAX_CIPHERTEXT = MAX_PLAINTEXT + 256
TAG_LENGTH = 16
# Header, inner content type and tag: what a record adds to its application bytes.
RECORD_OVERHEAD = HEADER.size + 1 + TAG_LENGTH
# open_records' first output buffer at most: the records of a transport read (256 KiB).
OPEN_BATCH = 16 * (MAX_PLAINTEXT + 1)
_INNER_TYPE = bytes([APPLICATION_DATA])
# Room for a growing output buffer is copied from here (no zeroing of a new object).
_ZEROS = memoryview(bytes(OPEN_BATCH))
# Batches of at least this many bytes are sealed or opened into a reused buffer.
POOLED_BATCH = 4 * MAX_PLAINTEXT
# Output buffers of recent batches, shared by every connection of the process. One is
# taken again only once nothing but this list refers to it (see _reusable): every byte a
# batch hands out is written by that batch, so a reused buffer is never zeroed again.
_POOL: list[bytearray] = []
POOL_SIZE = 4
# A batch larger than this gets a buffer of its own, freed with it: the pool keeps at most
# POOL_SIZE x this resident between batches. Twice the largest read of the data path (a
# multiplexed tunnel reads up to 1 MiB at once), so ordinary batches all stay pooled.
POOLED_MAX = 2 << 20


def drop_pooled_buffers() -> None:
    """Forget the pooled output buffers (a cache: a measurement of live memory after a run
    drops it first)."""
    _POOL.clear()


def _free_index(pool: list[bytearray], only: int) -> int:
    """The index of the first buffer of ``pool`` that nothing else refers to (-1: none):
    one whose reference count, seen from here, is ``only``."""
    for index in range(len(pool)):
        if sys.getrefcount(pool[index]) == only:
            return index
    return -1


def _calibrated() -> int:
    """What :func:`_free_index` sees for a buffer only a list refers to, measured rather
    than assumed (interpreters count borrowed references differently); 0 (never reuse)
    unless a buffer with one more holder is then seen as taken."""
    pool = [bytearray(1)]
    only = next((n for n in range(1, 16) if _free_index(pool, n) == 0), 0)
    held = memoryview(pool[0])
    if _free_index(pool, only) != -1:
        only = 0
    held.release()
    return only


# References to a pooled buffer nobody holds, as _free_index sees them. A holder (a
# transport, a memoryview of it, a caller) adds one, and the buffer is not reused.
_POOL_ONLY = _calibrated()


def _reusable(size: int) -> bytearray:
    """An output buffer of ``size`` bytes whose content is left over (not zeroed).

    A buffer from the pool is reused only when nobody else refers to it: the memoryviews
    and transport writes that hold a batch's bytes all hold a reference (CPython counts
    them exactly), so a buffer still being sent or read is never overwritten.
    """
    if size > POOLED_MAX:
        return bytearray(size)
    index = _free_index(_POOL, _POOL_ONLY) if _POOL_ONLY else -1
    if index >= 0:
        buffer = _POOL[index]
        if len(buffer) > size:
            del buffer[size:]  # keeps the allocation unless it halves
        elif len(buffer) < size:
            grow = size - len(buffer)
            buffer.extend(_ZEROS[:grow] if grow <= OPEN_BATCH else bytes(grow))
        return buffer
    buffer = bytearray(size)
    if len(_POOL) < POOL_SIZE:
        _POOL.append(buffer)
    return buffer


class SequenceState(Protocol):
    """Where the record sequence number of one direction is kept."""

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


def record_step(max_plaintext: int, framed: bool) -> int:
    """Application bytes in each full record :func:`seal` makes (a frame's header takes
    room of its own); whatever the framing, a full record is ``max_plaintext +
    RECORD_OVERHEAD`` bytes on the wire."""
    return max_plaintext - FRAME_HEADER.size if framed else max_plaintext


def seal(
    keys: TrafficKeys,
    plaintext: bytes | bytearray | memoryview,
    max_plaintext: int = MAX_PLAINTEXT,
    frame_type: int | None = None,
) -> bytearray:
    """Protect ``plaintext`` as application-data records of at most ``max_plaintext`` bytes
    each (16 KiB unless the peer asked for less with record_size_limit, RFC 8449).

    With ``frame_type`` every record's content is one frame of the peer protocol
    (``qkdproxy/1``): the type byte, the payload length in 3 bytes, then the next
    ``max_plaintext - 4`` bytes of ``plaintext``; the framing costs no copy of its own.

    Every record is encrypted straight into its place in one buffer sized up front (a
    reused one for a large batch: each of its bytes is written here, so it is not zeroed
    first): the only copy of the plaintext is the one that adds the frame header and the
    inner content type.
    """
    view = memoryview(plaintext)
    size = len(view)
    framed = frame_type is not None
    step = record_step(max_plaintext, framed)
    records = -(-size // step)
    total = size + records * (RECORD_OVERHEAD + (FRAME_HEADER.size if framed else 0))
    out = _reusable(total) if total >= POOLED_BATCH else bytearray(total)
    target = memoryview(out)
    aead, iv, state = keys.aead, keys.iv, keys.state
    frame_bits = (frame_type or 0) << 24
    pos, seqnum, header_size = 0, state.seqnum, HEADER.size
    try:
        for start in range(0, size, step):
            chunk = view[start : start + step]
            if framed:
                inner = b"".join((FRAME_HEADER.pack(frame_bits | len(chunk)), chunk, _INNER_TYPE))
            else:
                inner = b"".join((chunk, _INNER_TYPE))
            length = len(inner) + TAG_LENGTH
            header = HEADER.pack(APPLICATION_DATA, LEGACY_VERSION, length)
            target[pos : pos + header_size] = header
            pos += header_size
            aead.encrypt_into(
                (iv ^ seqnum).to_bytes(12, "big"), inner, header, target[pos : pos + length]
            )
            seqnum += 1
            pos += length
    finally:
        state.seqnum = seqnum  # once, not per record
        target.release()
    return out


@dataclass(slots=True)
class Opened:
    """What :func:`open_records` found at the front of a buffer."""

    # The application bytes of the opened records, contiguous (empty records add nothing).
    data: bytearray = field(default_factory=bytearray)
    # How many records were opened, and the bytes of the buffer that held them.
    records: int = 0
    consumed: int = 0
    # The next record is not plain application data: :func:`open_record` must read it.
    handoff: bool = False


def open_records(
    keys: TrafficKeys, buffer: bytes | bytearray | memoryview, into: bytearray | None = None
) -> Opened:
    """Open the complete application-data records at the front of ``buffer``.

    Stops at an incomplete record (more bytes needed) or at the first record that is
    anything but well-formed application data (``handoff``), leaving it and its sequence
    number to :func:`open_record`. Each record is decrypted straight into one output
    buffer, where the next record's bytes overwrite its content type and padding; with
    ``into`` the records' bytes follow those of ``into``: ``data`` is ``into`` appended
    to, or, when a large batch follows a few bytes (a record the last receive left
    incomplete), a reused buffer that starts with a copy of them.
    """
    view = memoryview(buffer)
    # Sized for a few records, then doubled as records open: never by the whole buffer,
    # or a peer interleaving other records (each a hand-off and a new call here) would
    # make every call zero a buffer as large as what is left. A large batch reuses a
    # buffer: only the bytes its records write are handed out (the rest is cut off).
    out, written = _output(min(len(view), OPEN_BATCH), into)
    aead, iv, state = keys.aead, keys.iv, keys.state
    opened = Opened(out)
    # The loop runs once per 16 KiB record: names are local, the output view is made again
    # only when the buffer grows, and the sequence number is written back once.
    seqnum, pos, size, header_size = state.seqnum, 0, len(view), HEADER.size
    target = memoryview(out)
    try:
        while size - pos >= header_size:
            kind, version, length = HEADER.unpack_from(view, pos)
            if (
                kind != APPLICATION_DATA
                or version != LEGACY_VERSION
                or not TAG_LENGTH < length <= MAX_CIPHERTEXT
            ):
                opened.handoff = True
                break
            end = pos + header_size + length
            if end > size:
                break
            need = written + length - TAG_LENGTH
            # RFC 8446 5.4 bounds the whole TLSInnerPlaintext, padding included.
            if need - written > MAX_PLAINTEXT + 1:
                opened.handoff = True
                break
            if len(target) < need:
                # Room for what is left of the buffer, at most a batch more at a time.
                target = _grow(out, target, max(need, written + min(size - pos, OPEN_BATCH)))
            try:
                aead.decrypt_into(
                    (iv ^ seqnum).to_bytes(12, "big"),
                    view[pos + header_size : end],
                    view[pos : end - length],
                    target[written:need],
                )
            except InvalidTag:
                opened.handoff = True
                break
            if out[need - 1] == APPLICATION_DATA:  # no padding: nearly every record
                written = need - 1
            else:
                content = _content_end(out, written, need)
                if content is None:
                    opened.handoff = True
                    break
                written = content
            seqnum += 1
            opened.records += 1
            pos = end
    finally:
        state.seqnum = seqnum
        target.release()
        view.release()
    del out[written:]
    opened.consumed = pos
    return opened


def _output(first: int, into: bytearray | None) -> tuple[bytearray, int]:
    """The buffer :func:`open_records` writes to, room for ``first`` bytes included, and
    how many bytes of it come before (those of ``into``)."""
    if into is None:
        return (_reusable(first) if first >= POOLED_BATCH else bytearray(first)), 0
    written = len(into)
    if first >= POOLED_BATCH and written < first:
        # Appending would zero the room for the batch first: copying what ``into`` holds
        # to the front of a reused buffer costs fewer bytes.
        out = _reusable(written + first)
        out[:written] = into
        return out, written
    return into, written


def _grow(out: bytearray, target: memoryview, size: int) -> memoryview:
    """Extend ``out`` to ``size`` bytes (copied from a zero buffer, not zeroed anew); the
    old view of it is released, a new one returned."""
    target.release()
    grow = size - len(out)
    out.extend(_ZEROS[:grow] if grow <= OPEN_BATCH else bytes(grow))
    return memoryview(out)


def _content_end(out: bytearray, start: int, end: int) -> int | None:
    """Where the application bytes of the TLSInnerPlaintext ``out[start:end]`` end; None if
    its content type is not application data (or it is all padding)."""
    if out[end - 1] == 0:  # padding: rare, so a copy is fine
        end = start + len(bytes(out[start:end]).rstrip(b"\0"))
    if end == start or out[end - 1] != APPLICATION_DATA:
        return None
    return end - 1


def seal_inner(keys: TrafficKeys, content: bytes, content_type: int) -> bytes:
    """Protect one record of any inner type (a handshake message, an alert)."""
    inner = content + bytes([content_type])
    header = HEADER.pack(APPLICATION_DATA, LEGACY_VERSION, len(inner) + TAG_LENGTH)
    record = header + keys.aead.encrypt(keys.nonce(), inner, header)
    keys.state.seqnum += 1
    return record


@dataclass(frozen=True, slots=True)
class InnerRecord:
    """One opened record: its inner content type and content, and its size on the wire."""

    content_type: int
    content: bytes
    size: int


def open_record(keys: TrafficKeys, buffer: bytes | bytearray | memoryview) -> InnerRecord | None:
    """Open the record at the front of ``buffer`` whatever it carries (None: incomplete).

    Raises :class:`RemoteProtocolError` with the alert RFC 8446 names for a record that
    must end the connection; the sequence number then stays where it was.
    """
    view = memoryview(buffer)
    if len(view) < HEADER.size:
        return None
    kind, _version, length = HEADER.unpack_from(view, 0)
    if kind != APPLICATION_DATA:
        # After the handshake every record is protected (RFC 8446 5.2): an unprotected
        # alert would let anyone on path end the stream as if the peer had closed it.
        raise RemoteProtocolError(
            f"unprotected record (type {kind}) after the handshake", Alert.UNEXPECTED_MESSAGE
        )
    if length > MAX_CIPHERTEXT:
        raise RemoteProtocolError(f"record of {length} bytes", Alert.RECORD_OVERFLOW)
    if length <= TAG_LENGTH:
        raise RemoteProtocolError("record shorter than its tag", Alert.BAD_RECORD_MAC)
    end = HEADER.size + length
    if len(view) < end:
        return None
    try:
        inner = keys.aead.decrypt(keys.nonce(), view[HEADER.size : end], view[: HEADER.size])
    except InvalidTag:
        raise RemoteProtocolError("record failed authentication", Alert.BAD_RECORD_MAC) from None
    if len(inner) > MAX_PLAINTEXT + 1:
        raise RemoteProtocolError("record plaintext over 2^14 bytes", Alert.RECORD_OVERFLOW)
    content = inner.rstrip(b"\0")
    if not content:
        raise RemoteProtocolError("record without a content type", Alert.UNEXPECTED_MESSAGE)
    keys.state.seqnum += 1
    return InnerRecord(content[-1], content[:-1], end)


def hkdf_expand_label(
    secret: bytes, label: bytes, length: int, hash_name: str, context: bytes = b""
) -> bytes:
    """HKDF-Expand-Label (RFC 8446 7.1, RFC 5869 2.3), with an empty context by default.

    Written on :func:`hmac.digest` because a peer's KeyUpdate costs three of these: at a
    few microseconds each a flood of KeyUpdates stays cheap. A handshake costs sixteen per
    side, nearly all one HMAC block long; the label's part of the input is built once.
    """
    prefix = _LABELS.get((label, length))
    if prefix is None:
        full = b"tls13 " + label
        prefix = _LABELS[(label, length)] = length.to_bytes(2, "big") + bytes([len(full)]) + full
    info = prefix + bytes([len(context)]) + context
    block = hmac.digest(secret, info + b"\x01", hash_name)
    if length <= len(block):
        return block[:length]
    out = block
    counter = 2
    while len(out) < length:
        block = hmac.digest(secret, block + info + bytes([counter]), hash_name)
        out += block
        counter += 1
    return out[:length]


# (label, length) -> the start of HKDF-Expand-Label's info; the labels are the RFC's and
# ours, a handful, so this never grows past a few dozen entries.
_LABELS: dict[tuple[bytes, int], bytes] = {}
