"""The ``qkdproxy-mux/1`` protocol without I/O: application connections as HTTP/2 CONNECT
streams inside one established tunnel (the HBONE convention).

:class:`MuxConnection` takes the tunnel's plaintext bytes in and gives events and bytes out;
the asyncio side (``daemon/muxconn.py``) moves the bytes and owns time.

The frames are HTTP/2 (RFC 9113) on the wire, but this module speaks only the subset that
``qkdproxy-mux/1`` (our own ALPN protocol) uses: DATA, HEADERS (one frame, END_HEADERS
set), PRIORITY (ignored), RST_STREAM, SETTINGS, PING, GOAWAY and WINDOW_UPDATE. Anything
else from the peer (CONTINUATION, PUSH_PROMISE, unknown frame types, trailers, a second
response) is a connection error: the tunnel ends, failing closed. It replaced the ``h2``
library on this path because ``h2`` alone cost about a quarter of a stream's CPU in each
daemon (docs/PERFORMANCE.md, "Cost of a multiplexed stream"). Our own header blocks are
constants without dynamic-table entries, recognised by comparison; any other block (an
older qkdproxy's ``h2`` encoder, a hostile peer) goes through the ``hpack`` decoder, which
keeps the dynamic table right.

The server tunnel's backend is fixed by its configuration: a CONNECT names no destination
the server would follow (its ``:authority`` is a constant), so a stream can reach nothing a
per-connection tunnel could not.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from enum import IntEnum

from hpack import Decoder
from hpack.exceptions import HPACKError

from qkdproxy.core.peer.frames import MUX_ALPN_PROTOCOL

MUX_ALPN = MUX_ALPN_PROTOCOL
AUTHORITY = "qkdproxy-backend:0"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# Each stream may have this much unread data in flight towards us; the connection window
# is this times the stream limit, so a stalled stream never stalls its neighbours.
STREAM_WINDOW = 1024 * 1024
# One DATA frame per read of the multiplexed pump (which reads at most this much at once).
FRAME_SIZE = 128 * 1024
MAX_HEADER_LIST = 4096

# Frame types (RFC 9113 section 6) and flags.
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
# Settings identifiers (RFC 9113 section 6.5.2).
HEADER_TABLE_SIZE, ENABLE_PUSH, MAX_CONCURRENT_STREAMS, INITIAL_WINDOW_SIZE = 1, 2, 3, 4
MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE = 5, 6
DEFAULT_WINDOW = 65535
DEFAULT_FRAME_SIZE = 16384
MAX_WINDOW = 2**31 - 1

_HEAD = struct.Struct(">HBBBI")  # length (24 bits: 16 + 8), type, flags, stream id
_U32 = struct.Struct(">I")
_SETTING = struct.Struct(">HI")
_GOAWAY = struct.Struct(">2I")


def _header(length: int, kind: int, flags: int, stream_id: int) -> bytes:
    return _HEAD.pack(length >> 8, length & 0xFF, kind, flags, stream_id)


# Our header blocks, HPACK-encoded once: literal fields "without indexing" and one indexed
# static entry, so they never touch either side's dynamic table (RFC 7541 section 6).
def _literal(static_index: int, value: bytes) -> bytes:
    return bytes((static_index, len(value))) + value


CONNECT_BLOCK = _literal(2, b"CONNECT") + _literal(1, AUTHORITY.encode())  # :method, :authority
ACCEPTED_BLOCK = b"\x88"  # ":status: 200", static entry 8
_STATUS_NAME = 8  # ":status" in the static table


class ErrorCode(IntEnum):
    """HTTP/2 error codes (RFC 9113 section 7)."""

    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    SETTINGS_TIMEOUT = 0x4
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    CONNECT_ERROR = 0xA
    ENHANCE_YOUR_CALM = 0xB
    INADEQUATE_SECURITY = 0xC
    HTTP_1_1_REQUIRED = 0xD


class ResetCode(IntEnum):
    """RST_STREAM codes qkdproxy sends (RFC 9113 section 7)."""

    NO_ERROR = ErrorCode.NO_ERROR
    CANCEL = ErrorCode.CANCEL
    REFUSED_STREAM = ErrorCode.REFUSED_STREAM
    CONNECT_ERROR = ErrorCode.CONNECT_ERROR


class MuxError(Exception):
    """An operation on a stream or tunnel that the protocol state does not allow."""


class _PeerError(Exception):
    """The peer broke the protocol: a connection error with this code."""

    def __init__(self, code: ErrorCode, why: str) -> None:
        super().__init__(why)
        self.code = code


@dataclass(frozen=True, slots=True)
class StreamOpened:
    """Server: the peer asked for a new stream (a CONNECT request)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamAccepted:
    """Client: the server accepted our CONNECT (status 200)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamRefused:
    """Client: the server refused our CONNECT (403: not allowed, 502: backend down...)."""

    stream_id: int
    status: int


@dataclass(frozen=True, slots=True)
class StreamUnprocessed:
    """Client: the server provably did not process the stream (RFC 9113 section 8.7): it
    reset it with REFUSED_STREAM before answering, or its GOAWAY named a lower last stream
    id. Nothing of it reached a backend, so it may be sent again on another tunnel; the
    stream is closed here. ``cause`` is ``"REFUSED_STREAM"`` or ``"GOAWAY"``."""

    stream_id: int
    cause: str


@dataclass(frozen=True, slots=True)
class StreamData:
    """Application bytes; acknowledge ``flow`` with :meth:`MuxConnection.consumed` once
    they were passed on (that is what lets the peer send more)."""

    stream_id: int
    data: bytes
    flow: int


@dataclass(frozen=True, slots=True)
class StreamFinished:
    """The peer ended its direction (END_STREAM: a half-close)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamBroken:
    """The peer reset the stream (RST_STREAM)."""

    stream_id: int
    code: int


@dataclass(frozen=True, slots=True)
class WindowOpened:
    """More may be sent on this stream (0: on every stream)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class PeerSettled:
    """The peer's first SETTINGS arrived: its stream limit is known from here on."""


@dataclass(frozen=True, slots=True)
class PingAnswered:
    """The peer answered our keepalive PING."""


@dataclass(frozen=True, slots=True)
class TunnelEnded:
    """GOAWAY received (``error`` False when the peer ended cleanly), or a protocol error."""

    reason: str
    error: bool


MuxEvent = (
    StreamOpened | StreamAccepted | StreamRefused | StreamUnprocessed | StreamData
    | StreamFinished | StreamBroken | WindowOpened | PeerSettled | PingAnswered | TunnelEnded
)  # fmt: skip


class _Stream:
    """One open stream's state: which directions are open, and both windows."""

    __slots__ = ("answered", "local_open", "receive_window", "remote_open", "send_window",
                 "unacked")  # fmt: skip

    def __init__(self, send_window: int) -> None:
        self.local_open = True  # we may still send (no END_STREAM or reset from us)
        self.remote_open = True  # the peer may still send
        self.send_window = send_window
        self.receive_window = STREAM_WINDOW
        self.unacked = 0  # consumed bytes not yet returned by WINDOW_UPDATE
        self.answered = False  # client: the response HEADERS arrived


class MuxConnection:
    """One multiplexed tunnel's HTTP/2 state (client: opens streams; server: accepts them)."""

    def __init__(self, *, client: bool, max_streams: int) -> None:
        self.client = client
        self.max_streams = max_streams
        self.ended: TunnelEnded | None = None
        # Until the peer's SETTINGS arrive its stream limit is unknown: a client that
        # opened streams before would risk exceeding a server with a lower limit.
        self.peer_settled = False
        self._out = bytearray()
        self._in = bytearray()
        self._need = 0  # how many bytes _in must hold before a frame can be parsed
        self._preface_due = not client  # a server first reads the client's preface
        self._streams: dict[int, _Stream] = {}
        self._next_id = 1 if client else 2  # our next stream id (a server opens none)
        self._last_peer_id = 0  # the highest stream id the peer opened
        # The last stream id our GOAWAY named (None: none sent): the peer's streams above it
        # are refused unprocessed, and a later GOAWAY of ours repeats it (ids never grow).
        self._goaway_last: int | None = None
        # The last stream id the peer's GOAWAY named: a later one may only name a lower id.
        self._peer_goaway_last: int | None = None
        self._open_outbound = 0
        self._open_inbound = 0
        # The peer's settings (RFC 9113 defaults until its SETTINGS say otherwise).
        self._peer_max_streams = MAX_WINDOW
        self._peer_initial_window = DEFAULT_WINDOW
        self._peer_frame_size = DEFAULT_FRAME_SIZE
        self._send_window = DEFAULT_WINDOW  # the connection's, towards the peer
        self._receive_window = STREAM_WINDOW * max_streams
        self._unacked = 0  # the connection's consumed bytes not yet returned
        self._decoder = Decoder()
        self._decoder.max_header_list_size = MAX_HEADER_LIST

    def start(self) -> None:
        """Queue the preface and our settings (stream limit, windows, no server push)."""
        if self.client:
            self._out += PREFACE
        settings = [
            (MAX_CONCURRENT_STREAMS, self.max_streams),
            (INITIAL_WINDOW_SIZE, STREAM_WINDOW),
            (MAX_FRAME_SIZE, FRAME_SIZE),
            (MAX_HEADER_LIST_SIZE, MAX_HEADER_LIST),
        ]
        if self.client:
            settings.append((ENABLE_PUSH, 0))
        self._out += _header(6 * len(settings), SETTINGS, 0, 0)
        for ident, value in settings:
            self._out += _SETTING.pack(ident, value)
        # The connection window starts at the default for everyone; open it to ours. The
        # peer may use our announced frame size and stream window from its first frame:
        # both only ever grow what it may assume, so we accept them from the start.
        self._window_update(0, self._receive_window - DEFAULT_WINDOW)

    # ------------------------------------------------------------------ inbound

    def receive(self, data: bytes | bytearray) -> list[MuxEvent]:
        """Feed the peer's bytes; a protocol violation ends the tunnel (TunnelEnded)."""
        if self.ended is not None and self.ended.error:
            return []
        if self._in:  # the rest of a frame in pieces
            self._in += data
            if len(self._in) < self._need:
                # Still short of the frame it waits for: no copy, no parse (a 128 KiB frame
                # in 1-byte records would otherwise be copied whole 128 Ki times).
                return []
            data = bytes(self._in)
            self._in.clear()
        elif not isinstance(data, bytes):
            data = bytes(data)
        out: list[MuxEvent] = []
        try:
            offset, size = 0, len(data)
            if self._preface_due:
                if not (
                    PREFACE.startswith(data) if size < len(PREFACE) else data.startswith(PREFACE)
                ):
                    raise _PeerError(ErrorCode.PROTOCOL_ERROR, "no HTTP/2 preface")
                if size < len(PREFACE):
                    self._in += data
                    return out
                offset, self._preface_due = len(PREFACE), False
            need = 9
            while size - offset >= 9:
                high, low, kind, flags, stream_id = _HEAD.unpack_from(data, offset)
                length = (high << 8) | low
                if length > FRAME_SIZE:
                    raise _PeerError(ErrorCode.FRAME_SIZE_ERROR, f"frame of {length} bytes")
                end = offset + 9 + length
                if end > size:
                    need = end - offset
                    break
                self._frame(kind, flags, stream_id & MAX_WINDOW, data[offset + 9 : end], out)
                offset = end
                if self.ended is not None and self.ended.error:
                    return out  # GOAWAY with an error: nothing behind it is acted on
            self._in += data[offset:]
            self._need = need
        except _PeerError as exc:
            self._goaway(exc.code)
            out.append(self._end(f"peer broke {MUX_ALPN_PROTOCOL}: {exc}"[:200], True))
        return out

    def _frame(
        self, kind: int, flags: int, stream_id: int, payload: bytes, out: list[MuxEvent]
    ) -> None:
        if not self.peer_settled and kind != SETTINGS:
            raise _PeerError(ErrorCode.PROTOCOL_ERROR, "first frame is not SETTINGS")
        if kind == DATA:
            self._data(flags, stream_id, payload, out)
        elif kind == HEADERS:
            self._headers(flags, stream_id, payload, out)
        elif kind == WINDOW_UPDATE:
            self._window_updated(stream_id, payload, out)
        elif kind == RST_STREAM:
            self._reset_received(stream_id, payload, out)
        elif kind == SETTINGS:
            self._settings(flags, stream_id, payload, out)
        elif kind == PING:
            if stream_id or len(payload) != 8:
                raise _PeerError(ErrorCode.PROTOCOL_ERROR, "malformed PING")
            if flags & ACK:
                out.append(PingAnswered())
            else:
                self._out += _header(8, PING, ACK, 0) + payload
        elif kind == GOAWAY:
            self._goaway_received(stream_id, payload, out)
        elif kind == PRIORITY:
            if not stream_id or len(payload) != 5:
                raise _PeerError(ErrorCode.PROTOCOL_ERROR, "malformed PRIORITY")
        else:  # CONTINUATION, PUSH_PROMISE, extensions: not in qkdproxy-mux/1
            raise _PeerError(ErrorCode.PROTOCOL_ERROR, f"frame type {kind} not expected")

    def _goaway_received(self, stream_id: int, payload: bytes, out: list[MuxEvent]) -> None:
        if stream_id or len(payload) < 8:
            raise _PeerError(ErrorCode.PROTOCOL_ERROR, "malformed GOAWAY")
        last, code = _GOAWAY.unpack_from(payload)
        last &= MAX_WINDOW
        if self._peer_goaway_last is not None and last > self._peer_goaway_last:
            # RFC 9113 section 6.8: the last stream id may only go down; a peer that takes
            # back a refusal could have the same request processed twice.
            raise _PeerError(ErrorCode.PROTOCOL_ERROR, "GOAWAY with a higher last stream id")
        self._peer_goaway_last = last
        if self.client:
            # Our streams above ``last`` were not processed (a last id naming streams we
            # never opened disowns nothing). Streams are kept in the order they were opened:
            # from the newest down, so a flood of GOAWAYs costs only the streams it closes.
            disowned: list[int] = []
            for sid in reversed(self._streams):
                if sid <= last:
                    break
                if self._streams[sid].answered:
                    # It answered 200: it may have acted on the stream. Not retried, ever.
                    raise _PeerError(ErrorCode.PROTOCOL_ERROR, f"GOAWAY disowns stream {sid}")
                disowned.append(sid)
            for sid in reversed(disowned):
                self._close(sid)
                out.append(StreamUnprocessed(sid, "GOAWAY"))
        out.append(self._end(f"peer sent GOAWAY ({_code_name(code)})", code != ErrorCode.NO_ERROR))

    def _known(self, stream_id: int) -> _Stream | None:
        """An open stream; None for one that closed; a connection error for one that was
        never opened (RFC 9113 section 5.1: frames on idle streams)."""
        stream = self._streams.get(stream_id)
        if stream is None:
            ours = (stream_id % 2 == 1) == self.client
            if not stream_id or stream_id >= (self._next_id if ours else self._last_peer_id + 1):
                raise _PeerError(ErrorCode.PROTOCOL_ERROR, f"frame on idle stream {stream_id}")
        return stream

    def _data(self, flags: int, stream_id: int, payload: bytes, out: list[MuxEvent]) -> None:
        flow = len(payload)
        stream = self._known(stream_id)
        if flow > self._receive_window:
            raise _PeerError(ErrorCode.FLOW_CONTROL_ERROR, "DATA beyond the tunnel's window")
        self._receive_window -= flow
        if stream is None:
            # A stream that closed (we reset it): its bytes must not shrink the window.
            self._credit(flow)
            return
        if not stream.remote_open or (self.client and not stream.answered):
            raise _PeerError(ErrorCode.STREAM_CLOSED, f"DATA out of place on {stream_id}")
        if flow > stream.receive_window:
            raise _PeerError(ErrorCode.FLOW_CONTROL_ERROR, f"DATA beyond stream {stream_id}")
        stream.receive_window -= flow
        out.append(StreamData(stream_id, _unpad(flags, payload), flow))
        if flags & END_STREAM:
            self._remote_ended(stream_id, stream, out)

    def _headers(self, flags: int, stream_id: int, payload: bytes, out: list[MuxEvent]) -> None:
        if not flags & END_HEADERS:
            raise _PeerError(ErrorCode.PROTOCOL_ERROR, "header block in more than one frame")
        block = _unpad(flags, payload)
        if flags & PRIORITY_FLAG:
            if len(block) < 5:
                raise _PeerError(ErrorCode.FRAME_SIZE_ERROR, "HEADERS too short")
            block = block[5:]
        if len(block) > MAX_HEADER_LIST:
            # Ours are constants of a few dozen bytes, h2's as short. hpack decodes any
            # number of table size updates (RFC 7541 allows two) at about a microsecond
            # each: a frame-sized block of them would cost a tenth of a second.
            raise _PeerError(ErrorCode.ENHANCE_YOUR_CALM, "header block too large")
        if self.client:
            stream = self._known(stream_id)
            fast = block == ACCEPTED_BLOCK
            status = b"200" if fast else self._decode(block).get(b":status", b"")
            if stream is None:
                return  # crossed our reset of the stream (decoded: HPACK state stays right)
            if stream.answered:
                raise _PeerError(ErrorCode.PROTOCOL_ERROR, f"second HEADERS on {stream_id}")
            stream.answered = True
            if fast:
                out.append(StreamAccepted(stream_id))
            else:
                code = int(status) if status.isdigit() and len(status) == 3 else 0
                if code == 200:
                    out.append(StreamAccepted(stream_id))
                elif code >= 200:
                    out.append(StreamRefused(stream_id, code))
                else:  # informational answers are not part of qkdproxy-mux/1
                    raise _PeerError(ErrorCode.PROTOCOL_ERROR, f"status {status!r}")
        else:
            if stream_id % 2 == 0 or stream_id <= self._last_peer_id:
                raise _PeerError(ErrorCode.PROTOCOL_ERROR, f"HEADERS out of place on {stream_id}")
            if self._goaway_last is not None:
                # Above the last id our GOAWAY named: refused, never reported, so nothing of
                # it reaches a backend (its DATA is dropped as a closed stream's) and the
                # client may send it elsewhere. Decoded all the same: HPACK state stays right.
                if block != CONNECT_BLOCK:
                    self._decode(block)
                self._last_peer_id = stream_id
                self._out += _header(4, RST_STREAM, 0, stream_id)
                self._out += _U32.pack(ErrorCode.REFUSED_STREAM)
                return
            if self._open_inbound >= self.max_streams:
                raise _PeerError(ErrorCode.REFUSED_STREAM, "more streams than our limit")
            self._last_peer_id = stream_id
            stream = self._streams[stream_id] = _Stream(self._peer_initial_window)
            self._open_inbound += 1
            method = b"CONNECT" if block == CONNECT_BLOCK else self._request_method(block)
            if method != b"CONNECT":
                self.refuse(stream_id, 405)
                self.reset(stream_id, ResetCode.NO_ERROR)  # no upload either: its slot is free
                return
            out.append(StreamOpened(stream_id))
        if flags & END_STREAM:
            self._remote_ended(stream_id, stream, out)

    def _request_method(self, block: bytes) -> bytes:
        """The method of a request we did not encode ourselves; a connection error if it
        is not a well-formed request header list."""
        headers = self._decode(block)
        method = headers.get(b":method")
        if method is None or (method == b"CONNECT") != (b":path" not in headers):
            raise _PeerError(ErrorCode.PROTOCOL_ERROR, "malformed request headers")
        return method

    def _decode(self, block: bytes) -> dict[bytes, bytes]:
        """A header block through HPACK (its dynamic table stays in step): names must be
        lower case, pseudo-headers first and once each."""
        try:
            fields = self._decoder.decode(block, raw=True)
        except HPACKError as exc:
            raise _PeerError(ErrorCode.COMPRESSION_ERROR, f"HPACK: {exc}") from None
        headers: dict[bytes, bytes] = {}
        regular = False
        for name, value in fields:
            pseudo = name.startswith(b":")
            if name != name.lower() or (pseudo and (regular or name in headers)):
                raise _PeerError(ErrorCode.PROTOCOL_ERROR, "malformed header list")
            regular = regular or not pseudo
            headers[name] = value
        return headers

    def _window_updated(self, stream_id: int, payload: bytes, out: list[MuxEvent]) -> None:
        if len(payload) != 4:
            raise _PeerError(ErrorCode.FRAME_SIZE_ERROR, "WINDOW_UPDATE of wrong size")
        increment = _U32.unpack(payload)[0] & MAX_WINDOW
        if not increment:
            raise _PeerError(ErrorCode.PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
        if not stream_id:
            shut = self._send_window <= 0
            self._send_window += increment
            if self._send_window > MAX_WINDOW:
                raise _PeerError(ErrorCode.FLOW_CONTROL_ERROR, "tunnel window overflow")
            if shut:
                # WindowOpened(0) wakes every stream: only those the tunnel window stopped
                # wait for it (a flood of updates to an open window must cost O(1) each).
                out.append(WindowOpened(0))
            return
        stream = self._known(stream_id)
        if stream is None:
            return  # crossed our end of the stream
        stream.send_window += increment
        if stream.send_window > MAX_WINDOW:
            raise _PeerError(ErrorCode.FLOW_CONTROL_ERROR, f"stream {stream_id} window overflow")
        out.append(WindowOpened(stream_id))

    def _reset_received(self, stream_id: int, payload: bytes, out: list[MuxEvent]) -> None:
        if len(payload) != 4:
            raise _PeerError(ErrorCode.FRAME_SIZE_ERROR, "RST_STREAM of wrong size")
        stream = self._known(stream_id)
        if stream is None:
            return  # both sides ended it at once
        self._close(stream_id)
        code = _U32.unpack(payload)[0]
        if code == ErrorCode.REFUSED_STREAM and self.client and not stream.answered:
            # Refused before any processing (RFC 9113 section 8.7); once answered, a reset
            # may follow work done, whatever its code says.
            out.append(StreamUnprocessed(stream_id, "REFUSED_STREAM"))
        else:
            out.append(StreamBroken(stream_id, code))

    def _settings(self, flags: int, stream_id: int, payload: bytes, out: list[MuxEvent]) -> None:
        if stream_id:
            raise _PeerError(ErrorCode.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise _PeerError(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        if len(payload) % 6:
            raise _PeerError(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS of wrong size")
        initial = self._peer_initial_window
        for offset in range(0, len(payload), 6):
            ident, value = _SETTING.unpack_from(payload, offset)
            if ident == MAX_CONCURRENT_STREAMS:
                self._peer_max_streams = value
            elif ident == INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise _PeerError(ErrorCode.FLOW_CONTROL_ERROR, "initial window too large")
                initial = value  # applied once below: the last value counts (RFC 9113 6.5.3)
            elif ident == MAX_FRAME_SIZE:
                if not DEFAULT_FRAME_SIZE <= value <= 2**24 - 1:
                    raise _PeerError(ErrorCode.PROTOCOL_ERROR, "invalid frame size")
                self._peer_frame_size = value
            elif ident == ENABLE_PUSH and value > 1:
                raise _PeerError(ErrorCode.PROTOCOL_ERROR, "invalid ENABLE_PUSH")
            # The rest (header table and list sizes) bind nothing we send: our header
            # blocks are constants that use no dynamic table.
        delta, self._peer_initial_window = initial - self._peer_initial_window, initial
        if delta:
            # Once per frame, not per entry: a frame of 20000 entries would otherwise walk
            # every stream 20000 times.
            for stream in self._streams.values():
                stream.send_window += delta
                if stream.send_window > MAX_WINDOW:
                    raise _PeerError(ErrorCode.FLOW_CONTROL_ERROR, "stream window overflow")
        self._out += _header(0, SETTINGS, ACK, 0)
        if not self.peer_settled:
            self.peer_settled = True
            out.append(PeerSettled())
        if delta > 0 and self._streams:
            out.append(WindowOpened(0))  # streams that waited for their window may send

    def _remote_ended(self, stream_id: int, stream: _Stream, out: list[MuxEvent]) -> None:
        stream.remote_open = False
        out.append(StreamFinished(stream_id))
        if not stream.local_open:
            self._close(stream_id)

    def _end(self, reason: str, error: bool) -> TunnelEnded:
        self.ended = TunnelEnded(reason, error)
        return self.ended

    # ----------------------------------------------------------------- outbound

    def open_stream(self) -> int:
        """Client: ask for a new stream (its CONNECT request); its id. :class:`MuxError` if
        :attr:`capacity` is 0 (the peer's limit is unknown yet, or reached)."""
        if not self.capacity:
            raise MuxError("no room for another stream in this tunnel")
        stream_id = self._next_id
        self._next_id += 2
        self._streams[stream_id] = _Stream(self._peer_initial_window)
        self._open_outbound += 1
        self._out += _header(len(CONNECT_BLOCK), HEADERS, END_HEADERS, stream_id)
        self._out += CONNECT_BLOCK
        return stream_id

    def accept(self, stream_id: int) -> None:
        """Server: the stream is authorised and its backend connected."""
        self._sending(stream_id)
        self._out += _header(1, HEADERS, END_HEADERS, stream_id) + ACCEPTED_BLOCK

    def refuse(self, stream_id: int, status: int) -> None:
        """Server: end a stream before it carried anything, saying why by status."""
        stream = self._sending(stream_id)
        block = _literal(_STATUS_NAME, b"%03d" % status)
        self._out += _header(len(block), HEADERS, END_HEADERS | END_STREAM, stream_id) + block
        self._local_ended(stream_id, stream)

    def window(self, stream_id: int) -> int:
        """How many bytes may be sent on the stream now."""
        stream = self._streams.get(stream_id)
        if stream is None:
            raise MuxError(f"stream {stream_id} is closed")
        return max(0, min(stream.send_window, self._send_window))

    def send(self, stream_id: int, data: bytes | bytearray | memoryview) -> int:
        """Queue as much of ``data`` as the flow-control windows allow; how much was queued."""
        stream = self._sending(stream_id)
        room = min(stream.send_window, self._send_window, len(data))
        if room <= 0:
            return 0
        size, out, view = self._peer_frame_size, self._out, memoryview(data)
        for start in range(0, room, size):
            step = min(size, room - start)
            out += _header(step, DATA, 0, stream_id)
            out += view[start : start + step]  # one copy: into the output buffer
        stream.send_window -= room
        self._send_window -= room
        return room

    def finish(self, stream_id: int) -> None:
        """End our direction of the stream (END_STREAM: a half-close)."""
        stream = self._sending(stream_id)
        self._out += _header(0, DATA, END_STREAM, stream_id)
        self._local_ended(stream_id, stream)

    def reset(self, stream_id: int, code: ResetCode = ResetCode.CANCEL) -> None:
        """Reset the stream (RST_STREAM); nothing if it is already closed."""
        if stream_id in self._streams:
            self._out += _header(4, RST_STREAM, 0, stream_id) + _U32.pack(code)
            self._close(stream_id)

    def consumed(self, stream_id: int, flow: int) -> bool:
        """``flow`` bytes of the stream were passed on: the peer may send that much more.
        True if that queued a WINDOW_UPDATE (to be flushed); windows are returned half
        at a time, so a short stream needs none at all."""
        if not flow:
            return False
        queued = self._credit(flow)
        stream = self._streams.get(stream_id)
        if stream is not None and stream.remote_open:
            stream.unacked += flow
            if stream.unacked >= STREAM_WINDOW // 2:
                stream.receive_window += stream.unacked
                self._window_update(stream_id, stream.unacked)
                stream.unacked = 0
                queued = True
        return queued

    def ping(self) -> None:
        """Queue a keepalive PING."""
        self._out += _header(8, PING, 0, 0) + os.urandom(8)

    def goaway(self) -> None:
        """Queue GOAWAY now, naming the last stream the peer opened: the streams it has open
        carry on, the ones it opens from here on are refused unprocessed (the peer may send
        them elsewhere). What a draining server says first."""
        if self._goaway_last is None and self.ended is None:
            self._goaway(ErrorCode.NO_ERROR)

    def close(self) -> None:
        """Queue GOAWAY (no new streams; the tunnel ends once the transport closes)."""
        if self.ended is None:
            if self._goaway_last is None:
                self._goaway(ErrorCode.NO_ERROR)
            self._end("closed", False)

    @property
    def pending(self) -> bool:
        """Bytes for the peer are queued."""
        return bool(self._out)

    @property
    def pending_size(self) -> int:
        """How many bytes for the peer are queued."""
        return len(self._out)

    def data_to_send(self) -> bytes | bytearray:
        """Bytes for the peer, queued by every call so far (the buffer itself, handed
        over: no copy of a 128 KiB frame)."""
        data, self._out = self._out, bytearray()
        return data

    @property
    def capacity(self) -> int:
        """Client: how many more streams the peer and our limit allow now (0 until the
        peer's SETTINGS said what its limit is)."""
        if not self.peer_settled or self.ended is not None or self._next_id > MAX_WINDOW:
            return 0  # (stream ids are 31 bits: a tunnel that used them all takes no more)
        limit = min(self.max_streams, self._peer_max_streams)
        return max(0, limit - self._open_outbound)

    # ------------------------------------------------------------------ helpers

    def _sending(self, stream_id: int) -> _Stream:
        stream = self._streams.get(stream_id)
        if stream is None or not stream.local_open:
            raise MuxError(f"stream {stream_id} is closed for sending")
        return stream

    def _local_ended(self, stream_id: int, stream: _Stream) -> None:
        stream.local_open = False
        if not stream.remote_open:
            self._close(stream_id)

    def _close(self, stream_id: int) -> None:
        del self._streams[stream_id]
        if (stream_id % 2 == 1) == self.client:
            self._open_outbound -= 1
        else:
            self._open_inbound -= 1

    def _credit(self, flow: int) -> bool:
        """Return consumed bytes to the tunnel's window (half of it at a time); True if
        that queued a WINDOW_UPDATE."""
        self._unacked += flow
        if self._unacked < STREAM_WINDOW * self.max_streams // 2:
            return False
        self._receive_window += self._unacked
        self._window_update(0, self._unacked)
        self._unacked = 0
        return True

    def _window_update(self, stream_id: int, increment: int) -> None:
        if increment > 0:
            self._out += _header(4, WINDOW_UPDATE, 0, stream_id) + _U32.pack(increment)

    def _goaway(self, code: ErrorCode) -> None:
        # The first GOAWAY fixes the last stream id: a later one (an error found while
        # draining) must not name more (RFC 9113 section 6.8).
        if self._goaway_last is None:
            self._goaway_last = self._last_peer_id
        self._out += _header(8, GOAWAY, 0, 0) + _GOAWAY.pack(self._goaway_last, code)


def _code_name(code: int) -> str:
    try:
        return ErrorCode(code).name
    except ValueError:
        return str(code)


def _unpad(flags: int, payload: bytes) -> bytes:
    """A DATA or HEADERS payload without its padding (a connection error if malformed)."""
    if not flags & PADDED:
        return payload
    if not payload or payload[0] >= len(payload):
        raise _PeerError(ErrorCode.PROTOCOL_ERROR, "padding longer than the frame")
    return payload[1 : len(payload) - payload[0]]
