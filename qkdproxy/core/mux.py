"""The ``qkdproxy-mux/1`` protocol without I/O: application connections as HTTP/2 CONNECT
streams inside one established tunnel (the HBONE convention), over the ``h2`` state machine.

:class:`MuxConnection` takes the tunnel's plaintext bytes in and gives events and bytes out;
the asyncio side (``tunnel/muxconn.py``) moves the bytes and owns time. Only this module
imports ``h2``, so the rest of qkdproxy sees our own events and error codes.

The server tunnel's backend is fixed by its configuration: a CONNECT names no destination
the server would follow (its ``:authority`` is a constant), so a stream can reach nothing a
per-connection tunnel could not.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from enum import IntEnum

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    PingAckReceived,
    RemoteSettingsChanged,
    RequestReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import H2Error, ProtocolError
from h2.settings import SettingCodes
from hyperframe import frame as _hyperframe

from qkdproxy.core.peer.frames import MUX_ALPN_PROTOCOL

MUX_ALPN = MUX_ALPN_PROTOCOL
AUTHORITY = "qkdproxy-backend:0"
# Our headers as bytes, built once: h2 would encode str headers again for every stream.
CONNECT_REQUEST = ((b":method", b"CONNECT"), (b":authority", AUTHORITY.encode()))
ACCEPTED = ((b":status", b"200"),)
# Each stream may have this much unread data in flight towards us; the connection window
# is this times the stream limit, so a stalled stream never stalls its neighbours.
STREAM_WINDOW = 1024 * 1024
# As large as one read of the pump (READ_SIZE): one DATA frame per read, since h2's work is
# per frame (a 128 KiB frame costs about what a 16 KiB one does).
FRAME_SIZE = 128 * 1024
MAX_HEADER_LIST = 4096


def _data_frame_repr(frame: _hyperframe.DataFrame) -> str:
    """What a DATA frame's repr shows of its body: the length, not the bytes."""
    return f"<{len(frame.data)} bytes>"


# h2 formats repr(frame) of every frame it receives, for a trace log it then drops
# (h2/connection.py, ``_receive_frame``). hyperframe's DataFrame has no body repr of its own,
# so the generic one serialises the whole body (a copy of up to FRAME_SIZE bytes) and
# hexlifies it: about a tenth of the receive path's CPU. DataFrame's own ``_body_repr``
# (the hook Frame.__repr__ calls for the body, defined by most other frame types) changes
# nothing but that text; if hyperframe ever stops calling it, it is simply unused.
_hyperframe.DataFrame._body_repr = _data_frame_repr  # type: ignore[method-assign,assignment]


class ResetCode(IntEnum):
    """RST_STREAM codes qkdproxy sends (RFC 9113 section 7)."""

    NO_ERROR = ErrorCodes.NO_ERROR
    CANCEL = ErrorCodes.CANCEL
    REFUSED_STREAM = ErrorCodes.REFUSED_STREAM
    CONNECT_ERROR = ErrorCodes.CONNECT_ERROR


class MuxError(Exception):
    """An operation on a stream or tunnel that the protocol state does not allow."""


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
    StreamOpened | StreamAccepted | StreamRefused | StreamData | StreamFinished | StreamBroken
    | WindowOpened | PeerSettled | PingAnswered | TunnelEnded
)  # fmt: skip


class MuxConnection:
    """One multiplexed tunnel's HTTP/2 state (client: opens streams; server: accepts them)."""

    def __init__(self, *, client: bool, max_streams: int) -> None:
        self.client = client
        self.max_streams = max_streams
        self._h2 = H2Connection(
            H2Configuration(
                client_side=client,
                header_encoding=None,
                # The peer's headers are checked; ours are constants of this module, so
                # checking and normalising them again per stream is pure cost.
                validate_inbound_headers=True,
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
            )
        )
        self.ended: TunnelEnded | None = None
        # Until the peer's SETTINGS arrive, h2 assumes no stream limit at all: a client that
        # opened streams by that would exceed a server with a lower limit, which h2 there
        # answers by ending the whole tunnel (TooManyStreams).
        self.peer_settled = False

    def start(self) -> None:
        """Queue the preface and our settings (stream limit, windows, no server push)."""
        self._h2.initiate_connection()
        settings: dict[SettingCodes | int, int] = {
            SettingCodes.MAX_CONCURRENT_STREAMS: self.max_streams,
            SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            SettingCodes.MAX_FRAME_SIZE: FRAME_SIZE,
            SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST,
        }
        if self.client:
            settings[SettingCodes.ENABLE_PUSH] = 0
        self._h2.update_settings(settings)
        # h2 applies a frame-size setting only once acknowledged, and checks a whole batch
        # of received bytes against the size in force when the batch began: a peer's ACK
        # and its first large frame in one batch would be a FRAME_SIZE_ERROR. Accepting
        # our announced size from the start is what the peer may assume anyway.
        self._h2.max_inbound_frame_size = FRAME_SIZE
        self._h2.increment_flow_control_window(STREAM_WINDOW * self.max_streams - 65535)

    # ------------------------------------------------------------------ inbound

    def receive(self, data: bytes | bytearray) -> list[MuxEvent]:
        """Feed the peer's bytes; a protocol violation ends the tunnel (TunnelEnded)."""
        if self.ended is not None and self.ended.error:
            return []
        try:
            h2_events = self._h2.receive_data(data)
        except ProtocolError as exc:
            return [
                self._end(
                    f"peer broke {MUX_ALPN_PROTOCOL}: {type(exc).__name__}: {exc}"[:200], True
                )
            ]
        out: list[MuxEvent] = []
        for event in h2_events:
            out.extend(self._translate(event))
        return out

    def _translate(self, event: Event) -> list[MuxEvent]:
        if isinstance(event, DataReceived) and event.stream_id is not None:
            return [
                StreamData(event.stream_id, event.data or b"", event.flow_controlled_length or 0)
            ]
        if isinstance(event, StreamEnded) and event.stream_id is not None:
            return [StreamFinished(event.stream_id)]
        if isinstance(event, StreamReset) and event.stream_id is not None:
            return [StreamBroken(event.stream_id, int(event.error_code or 0))]
        if isinstance(event, WindowUpdated):
            return [WindowOpened(event.stream_id or 0)]
        if isinstance(event, RemoteSettingsChanged):
            if self.peer_settled:
                return [WindowOpened(0)]
            self.peer_settled = True
            return [PeerSettled(), WindowOpened(0)]
        if isinstance(event, RequestReceived) and event.stream_id is not None:
            return self._request(event.stream_id, dict(event.headers or []))
        if isinstance(event, ResponseReceived) and event.stream_id is not None:
            status = dict(event.headers or []).get(b":status", b"")
            if status == b"200":
                return [StreamAccepted(event.stream_id)]
            code = int(status) if status.isdigit() else 0
            return [StreamRefused(event.stream_id, code)]
        if isinstance(event, PingAckReceived):
            return [PingAnswered()]
        if isinstance(event, ConnectionTerminated):
            error = event.error_code not in (None, ErrorCodes.NO_ERROR)
            name = ErrorCodes(event.error_code).name if event.error_code is not None else "?"
            return [self._end(f"peer sent GOAWAY ({name})", error)]
        return []  # settings acknowledgements, priority, informational responses

    def _request(self, stream_id: int, headers: dict[bytes, bytes]) -> list[MuxEvent]:
        if self.client:
            # A client never accepts streams: h2 already refuses server pushes.
            self.reset(stream_id, ResetCode.REFUSED_STREAM)
            return []
        if headers.get(b":method") != b"CONNECT":
            self.refuse(stream_id, 405)
            return []
        return [StreamOpened(stream_id)]

    def _end(self, reason: str, error: bool) -> TunnelEnded:
        self.ended = TunnelEnded(reason, error)
        return self.ended

    # ----------------------------------------------------------------- outbound

    def open_stream(self) -> int:
        """Client: ask for a new stream (its CONNECT request); its id. :class:`MuxError` if
        :attr:`capacity` is 0 (the peer's limit is unknown yet, or reached)."""
        if not self.capacity:
            raise MuxError("no room for another stream in this tunnel")
        stream_id: int = self._h2.get_next_available_stream_id()
        self._h2.send_headers(stream_id, CONNECT_REQUEST)
        return stream_id

    def accept(self, stream_id: int) -> None:
        """Server: the stream is authorised and its backend connected."""
        self._h2.send_headers(stream_id, ACCEPTED)

    def refuse(self, stream_id: int, status: int) -> None:
        """Server: end a stream before it carried anything, saying why by status."""
        self._h2.send_headers(stream_id, ((b":status", str(status).encode()),), end_stream=True)

    def window(self, stream_id: int) -> int:
        """How many bytes may be sent on the stream now."""
        try:
            return int(self._h2.local_flow_control_window(stream_id))
        except H2Error:
            raise MuxError(f"stream {stream_id} is closed") from None

    def send(self, stream_id: int, data: bytes | bytearray | memoryview) -> int:
        """Queue as much of ``data`` as the flow-control windows allow; how much was queued."""
        sent = 0
        size = self._h2.max_outbound_frame_size
        while sent < len(data) and (room := self.window(stream_id)) > 0:
            step = min(room, size)
            # Usually one frame takes it all: pass it as it is (no copy of our own).
            if not sent and len(data) <= step and isinstance(data, bytes):
                chunk = data
            else:
                chunk = bytes(data[sent : sent + step])
            try:
                self._h2.send_data(stream_id, chunk)
            except H2Error as exc:
                raise MuxError(f"stream {stream_id}: {exc}") from None
            sent += len(chunk)
        return sent

    def finish(self, stream_id: int) -> None:
        """End our direction of the stream (END_STREAM: a half-close)."""
        try:
            self._h2.end_stream(stream_id)
        except H2Error as exc:
            raise MuxError(f"stream {stream_id}: {exc}") from None

    def reset(self, stream_id: int, code: ResetCode = ResetCode.CANCEL) -> None:
        """Reset the stream (RST_STREAM); nothing if it is already closed."""
        # Closed already: the peer learnt the stream's end before.
        with contextlib.suppress(H2Error):
            self._h2.reset_stream(stream_id, code)

    def consumed(self, stream_id: int, flow: int) -> None:
        """``flow`` bytes of the stream were passed on: the peer may send that much more."""
        if flow:
            # The stream may have closed meanwhile; h2 credits the connection window then.
            with contextlib.suppress(H2Error):
                self._h2.acknowledge_received_data(flow, stream_id)

    def ping(self) -> None:
        """Queue a keepalive PING."""
        self._h2.ping(os.urandom(8))

    def close(self) -> None:
        """Queue GOAWAY (no new streams; the tunnel ends once the transport closes)."""
        if self.ended is None:
            self._h2.close_connection()
            self._end("closed", False)

    def data_to_send(self) -> bytes:
        """Bytes for the peer, queued by every call so far."""
        return bytes(self._h2.data_to_send())

    @property
    def capacity(self) -> int:
        """Client: how many more streams the peer and our limit allow now (0 until the
        peer's SETTINGS said what its limit is)."""
        if not self.peer_settled:
            return 0
        limit = min(self.max_streams, self._h2.remote_settings.max_concurrent_streams)
        return max(0, limit - self._h2.open_outbound_streams)
