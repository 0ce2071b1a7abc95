"""The asyncio driver of :class:`~qkdproxy.core.tls.connection.TlsConnection`: handshakes over
asyncio streams with key requests answered from the key sources, then a byte stream.

All protocol decisions live in the sans-I/O connection and record layer; this module only
moves bytes, answers :class:`KeyNeeded` through :mod:`qkdproxy.keys.key_supply` and turns
the deadline into :meth:`TlsConnection.handle_timer` calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from qkdproxy.core.errors import LocalProtocolError, QkdproxyError, SettingError
from qkdproxy.core.hybrid import HybridKem, KeyPairReserve
from qkdproxy.core.peer.frames import ALPN_PROTOCOL, MUX_ALPN_PROTOCOL
from qkdproxy.core.tls.connection import (
    ConnectionConfig,
    HandshakeComplete,
    HandshakeError,
    KeyNeeded,
    Outcome,
    Phase,
    TlsConnection,
)
from qkdproxy.core.tls.credentials import Credentials
from qkdproxy.core.tls.engine import DEFAULT_ENGINE, ENGINES, EngineSpec
from qkdproxy.core.tls.events import (
    DataReceived,
    Failed,
    FreshKeysInstalled,
    PeerClosed,
    RecordEvent,
    Side,
    Truncated,
    UpdateKeyNeeded,
)
from qkdproxy.core.tls.identity import PeerIdentity
from qkdproxy.core.tls.keyexchange import CloseStream, HandshakeRecord, KeyAnswer, KeySteps
from qkdproxy.core.tls.native import NativeEngineSpec
from qkdproxy.core.tls.record_layer import RecordLayer
from qkdproxy.core.tls.records import RECORD_OVERHEAD, record_step
from qkdproxy.core.tls.sent import Delivery, SentLedger
from qkdproxy.core.tls.verify import PeerPolicy
from qkdproxy.core.tls.wire import Alert
from qkdproxy.io import aio, sendq
from qkdproxy.io.socket_reader import SocketReader
from qkdproxy.keys.context import KeyContext
from qkdproxy.keys.key_supply import close_later, supply

__all__ = [
    "EndpointSettings",
    "HandshakeError",
    "Outcome",
    "TlsEndpoint",
    "TlsStream",
    "TlsStreamError",
    "close_transport",
]

log = logging.getLogger(__name__)

IDENTITY_ALERTS = frozenset(
    {
        Alert.BAD_CERTIFICATE,
        Alert.UNSUPPORTED_CERTIFICATE,
        Alert.CERTIFICATE_REVOKED,
        Alert.CERTIFICATE_EXPIRED,
        Alert.CERTIFICATE_UNKNOWN,
        Alert.UNKNOWN_CA,
        Alert.ACCESS_DENIED,
        Alert.CERTIFICATE_REQUIRED,
    }
)

READ_CHUNK = 64 * 1024
# An established stream reads its socket into a buffer of this size: the records of one
# receive are opened in one batch (RecordLayer.receive copies only an incomplete tail);
# 256 KiB halves the receives per byte against 128 (docs/PERFORMANCE.md "Cost of a byte").
RECEIVE_BUFFER = 256 * 1024
# What a read returns at most by default: all one receive opened (its records and the one
# a previous receive left incomplete), handed over without a copy.
READ_MAX = 2 * RECEIVE_BUFFER
CLOSE_TIMEOUT = 5.0


class TlsStreamError(ConnectionError, QkdproxyError):
    """An established stream ended abnormally (fatal alert, bad record, transport error).

    ``side`` says who sent ``alert``: we did (the peer broke the protocol) or the peer.
    ``truncated``: the stream ended without a protected close_notify (or, on
    ``qkdproxy/1``, without FIN), so the data may have been cut short and the plaintext
    side must never see a clean end.
    """

    def __init__(
        self,
        reason: str,
        alert: int | None = None,
        side: Side | None = None,
        *,
        truncated: bool = False,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.alert = alert
        self.side = side
        self.truncated = truncated

    @property
    def identity_refused(self) -> bool:
        """The peer refused our certificate right after the handshake (a server checks the
        client's then): to the application this is a failed handshake, not a cut stream."""
        return self.side is Side.REMOTE and self.alert in IDENTITY_ALERTS


def _sni_name(server_name: str | None) -> str | None:
    """SNI carries DNS names only (RFC 6066 3); IP addresses are checked, not sent."""
    if not server_name:
        return None
    try:
        ipaddress.ip_address(server_name)
    except ValueError:
        return server_name
    return None


def utc_now() -> datetime:
    """The default clock for certificate validation."""
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class EndpointSettings:
    """One TLS endpoint: identity, whom it accepts, groups in preference order, key context."""

    credentials: Credentials
    peer: PeerPolicy
    groups: Sequence[HybridKem]
    keys: KeyContext
    handshake_timeout: float = 10.0
    clock: Callable[[], datetime] = utc_now
    # Offer ALPN qkdproxy/1, the framed protocol only qkdproxy peers speak.
    peer_protocol: bool = True
    # Offer Extended Key Update (negotiated with qkdproxy peers only: other stacks ignore the
    # flag); refuse a peer that does not offer it.
    fresh_key_update: bool = True
    require_fresh_key_update: bool = False
    # How long an Extended Key Update may wait for the peer (None: handshake_timeout).
    fresh_key_deadline: float | None = None
    # Also offer (first) ALPN qkdproxy-mux/1: multiplexed tunnels (tunnel/mux.py).
    mux_protocol: bool = False
    # The TLS 1.3 handshake engine: "native" (ours) or "tlslite" (core/tls/engine.py).
    tls_engine: str = DEFAULT_ENGINE


@dataclass(frozen=True, slots=True)
class FreshKeyStats:
    """What a stream's Extended Key Updates did, for its connection log line."""

    completed: int = 0
    failed: int = 0
    abandoned: int = 0
    key_ids: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Transport:
    """The asyncio stream pair a connection runs over."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


@dataclass(slots=True)
class TlsStream:
    """An established TLS 1.3 connection: ``read``/``write`` plaintext, then ``close``.

    Every record goes through our :class:`RecordLayer`; each call that makes it produce
    bytes hands them to the transport before yielding to the event loop, so records
    written by concurrent reads (a KeyUpdate answer) and writes keep their order.
    """

    _driver: Transport = field(repr=False)
    _socket: SocketReader = field(repr=False)
    _layer: RecordLayer = field(repr=False)
    record: HandshakeRecord
    peer: PeerIdentity
    handshake_seconds: float
    cipher: str
    alpn: str | None
    # Plaintext opened but not yet returned (a read asked for less than a record held).
    _plaintext: bytearray = field(default_factory=bytearray, repr=False)
    _peer_closed: bool = field(default=False, repr=False)
    _reading: bool = field(default=False, repr=False)
    # Events from bytes that arrived with the end of the handshake, handled on first read.
    _backlog: list[RecordEvent] = field(default_factory=list, repr=False)
    # The client's last handshake flight, held until the first write or the end of the
    # next round of the event loop, whichever comes first: a client whose application
    # already sent bytes sends its Finished and those bytes in one write, not two.
    _corked: bytes | bytearray = field(default=b"", repr=False)
    # How the stream broke, once it did.
    failure: TlsStreamError | None = field(default=None, repr=False)
    # The key sources Extended Key Updates draw from, and when the last one completed
    # (monotonic; the handshake's end until then).
    _keys: KeyContext | None = field(default=None, repr=False)
    fresh_keys_at: float = field(default_factory=time.monotonic)
    # Ciphertext handed to the transport since the handshake, and where the application
    # bytes among it went (made on the first write of some: a handshake pays nothing).
    _written: int = field(default=0, repr=False)
    _sent: SentLedger | None = field(default=None, repr=False)
    # Once our side dropped what the transport held for the peer (a reset, a close cut
    # short): what of the application bytes written had left before (None: no such drop).
    delivered: Delivery | None = field(default=None, repr=False)

    async def read(self, max_bytes: int = READ_MAX) -> bytes | bytearray:
        """Up to ``max_bytes`` of plaintext; b"" once the peer closed cleanly.

        A fatal alert, a protocol violation or a transport closed without close_notify
        closes the transport and raises :class:`TlsStreamError` (``truncated`` for the
        last).
        """
        self._reading = True  # see check_fresh_key_deadline
        try:  # in one frame: a read is resumed on every receive of a connection
            if self._backlog:
                events, self._backlog = self._backlog, []
                await self._handle(events, deliver=True)
            while not self._plaintext and not self._peer_closed:
                if self.failure is not None:
                    # Another task (a write, a fresh-key update) failed the stream: the record
                    # layer takes nothing more, so say so rather than read on.
                    raise self.failure
                try:
                    data = await self._socket.peek()
                except ConnectionError as exc:
                    raise await self._fail(TlsStreamError(f"{type(exc).__name__}: {exc}")) from None
                try:
                    if data:
                        # The record layer opens the records in place and keeps a copy of an
                        # incomplete tail: the socket's buffer is free again right after.
                        events = self._layer.receive(data, time.monotonic())
                    else:
                        events = self._layer.receive_eof()
                except Exception as exc:
                    # A bug of ours, never the peer's fault: keep the traceback, say internal_error.
                    log.error("internal error in the record layer", exc_info=exc)
                    reason = f"internal error ({type(exc).__name__})"
                    events = [self._layer.fail(Alert.INTERNAL_ERROR, reason)]
                finally:
                    self._socket.consume(len(data))
                await self._handle(events, deliver=True)
            if len(self._plaintext) <= max_bytes:
                # Everything opened so far, handed over as it is: no copy.
                plaintext, self._plaintext = self._plaintext, bytearray()
                return plaintext
            plaintext = self._plaintext[:max_bytes]
            del self._plaintext[:max_bytes]
            return plaintext
        finally:
            self._reading = False

    async def _handle(self, events: list[RecordEvent], *, deliver: bool = False) -> None:
        """Apply what the record layer reported; raise if the stream ended badly.

        An Extended Key Update's key request is answered here, like a handshake's: the
        inbound side waits for it (records after a key_update_response may need the new
        keys), the outbound side goes on writing. With ``deliver`` (a read), authenticated
        data that came before the end of a broken stream is returned first and the next
        read raises: how much of a batch a receive holds must not decide what is delivered.
        """
        self._transmit()
        pending = list(events)
        while pending:
            event = pending.pop(0)
            if isinstance(event, UpdateKeyNeeded):
                pending[:0] = await self._answer_update(event)
            elif isinstance(event, FreshKeysInstalled):
                self.fresh_keys_at = time.monotonic()
            elif isinstance(event, DataReceived):
                if not self._plaintext and isinstance(event.data, bytearray):
                    self._plaintext = event.data  # the record layer's buffer, not shared
                else:
                    self._plaintext += event.data
            elif isinstance(event, PeerClosed):
                self._peer_closed = True
            elif isinstance(event, Truncated | Failed):
                if isinstance(event, Truncated):
                    error = TlsStreamError(event.reason, truncated=True)
                else:
                    error = TlsStreamError(event.reason, event.alert, event.side)
                failure = await self._fail(error)
                if deliver and self._plaintext:
                    return  # the stream is failed: the next read raises it
                raise failure

    async def _answer_update(self, event: UpdateKeyNeeded) -> list[RecordEvent]:
        assert self._keys is not None
        if isinstance(event.request, CloseStream):
            close_later(self._keys, event.request.ksid)
            return []
        answer = await supply(event.request, self._keys)
        events = self._layer.answer_update_key(answer, time.monotonic())
        self._transmit()
        return events

    @property
    def keys(self) -> KeyContext | None:
        """The key context of the endpoint this stream was established by (a reload may
        have given its tunnel another since): the supply its peer was announced."""
        return self._keys

    @property
    def fresh_key_updates(self) -> bool:
        """True if both sides negotiated Extended Key Update."""
        return self._layer.eku is not None

    @property
    def fresh_key_originator(self) -> bool:
        """True if this side originates the updates' QKD key ids (see
        :class:`~qkdproxy.core.tls.eku_state.FreshKeyUpdates`)."""
        return self._layer.eku is not None and self._layer.eku.originator

    def fresh_key_stats(self) -> FreshKeyStats:
        """Extended Key Updates completed, failed and cut short by the end on this stream,
        and the QKD key ids the completed ones spent."""
        eku = self._layer.eku
        if eku is None:
            return FreshKeyStats()
        stats = eku.stats
        return FreshKeyStats(stats.completed, stats.failed, stats.abandoned, list(stats.key_ids))

    async def fresh_key_update(self) -> bool:
        """Start an Extended Key Update (a fresh key exchange, on a QKD group a fresh QKD key):
        the key is taken first, then the request goes out; data keeps flowing meanwhile.
        False if not negotiated, the stream ended or an update is already running. A key
        source failure fails the stream (closed) and raises :class:`TlsStreamError`."""
        prepared = self._layer.prepare_fresh_update()
        if prepared is None:
            return False
        kex, steps = prepared
        assert self._layer.eku is not None
        try:
            await self._run_update_steps(steps)
        except QkdproxyError as exc:
            events = self._layer.eku.discard(kex, failed=True)
            alert = getattr(exc, "alert", Alert.INTERNAL_ERROR)
            events.append(self._layer.fail(Alert(alert), f"fresh key update: {exc}"))
            await self._handle(events)
            return False  # pragma: no cover - _handle raised
        except asyncio.CancelledError:
            # The connection is being torn down: whatever key the update holds is wasted
            # and settled now, not left held forever.
            self._close_streams_later(self._layer.eku.discard(kex))
            raise
        await self._handle(self._layer.begin_fresh_update(kex, time.monotonic()))
        return True

    async def check_fresh_key_deadline(self) -> None:
        """Fail the stream (:class:`TlsStreamError`) if an Extended Key Update has stayed
        unfinished past its deadline. While nobody reads this stream (our consumer is slow)
        or our writes wait for the peer to read, the clock stops: that is flow control."""
        writer = self._driver.writer
        held = not self._reading or writer.transport.get_write_buffer_size() > 0
        await self._handle(self._layer.check_fresh_update(time.monotonic(), held))

    def _close_streams_later(self, events: list[RecordEvent]) -> None:
        """Hand the ETSI 004 stream closes among ``events`` to the background closer."""
        assert self._keys is not None
        for event in events:
            if isinstance(event, UpdateKeyNeeded) and isinstance(event.request, CloseStream):
                close_later(self._keys, event.request.ksid)

    async def _run_update_steps(self, steps: KeySteps[None]) -> None:
        """Run an update's preparing step, answering from this stream's key sources."""
        assert self._keys is not None
        answer: KeyAnswer = None
        while True:
            try:
                request = steps.steps.send(answer)
            except StopIteration:
                return
            answer = await supply(request, self._keys)

    def _transmit(self) -> None:
        """Hand what the record layer queued to the transport (without yielding)."""
        out = self._layer.data_to_send()
        if self._corked:
            out, self._corked = self._corked + out, b""
        if out:
            # The transport itself: StreamWriter's write and is_closing only forward to it.
            transport = self._driver.writer.transport
            if transport.is_closing():
                # uvloop raises RuntimeError on a write to a closed transport.
                raise TlsStreamError("transport already closed")
            transport.write(out)
            self._written += len(out)

    def _uncork(self) -> None:
        """A round after the handshake: a flight nobody wrote with data leaves alone."""
        transport = self._driver.writer.transport
        if self._corked and not transport.is_closing():
            transport.write(self._corked)
            self._written += len(self._corked)
        self._corked = b""

    async def write(
        self,
        data: bytes | bytearray | memoryview,
        *,
        frame_type: int | None = None,
        application: bool = False,
    ) -> None:
        """Send plaintext, one record per 16 KiB; :class:`TlsStreamError` if the stream broke.
        With ``frame_type`` each record carries one ``qkdproxy/1`` frame of ``data``.
        ``application``: ``data`` is the application's bytes (not a control frame), which
        :attr:`delivered` counts."""
        await self._send(
            lambda: self._layer.send_data(data, frame_type),
            len(data) if application else 0,
            frame_type is not None,
        )

    async def update_keys(self, request_peer: bool = False) -> None:
        """TLS 1.3 KeyUpdate of our sending keys (long-lived flows).

        Each side renews its own sending keys on its own budget: qkdproxy never asks the
        peer to answer unless ``request_peer`` says so.
        """
        await self._send(lambda: self._layer.update_keys(request_peer))

    def write_nowait(self, data: bytes | bytearray | memoryview) -> bool:
        """:meth:`write` from a callback: the records go to the transport now, nobody waits
        for its buffer; whether that buffer is now past its high-water mark (then send no
        more until :meth:`drain` returned). On :class:`TlsStreamError` the caller resets
        the transport (no close_notify: the stream failed)."""
        self._queue_now(lambda: self._layer.send_data(data, None))
        transport = self._driver.writer.transport
        return transport.get_write_buffer_size() > transport.get_write_buffer_limits()[1]

    async def drain(self) -> None:
        """Wait until the transport's buffer is below its high-water mark."""
        try:
            await self._driver.writer.drain()
        except ConnectionError as exc:
            raise await self._fail(TlsStreamError(f"{type(exc).__name__}: {exc}")) from None

    async def _send(
        self, queue: Callable[[], None], application: int = 0, framed: bool = False
    ) -> None:
        """Queue records with ``queue``, hand them to the transport, wait for its buffer.
        ``application``: the application bytes the records carry (``framed``: each record
        one frame of them); they are the last records handed over."""
        try:
            self._queue_now(queue)
        except TlsStreamError:
            await self._close_transport()  # closing already, or failed here
            raise
        if application:
            self._note_sealed(application, framed)
        await self.drain()

    def _note_sealed(self, application: int, framed: bool) -> None:
        """Note a batch of application records just handed over (in the ledger)."""
        limit = self._layer.send_limit
        if self._sent is None:
            self._sent = SentLedger(limit + RECORD_OVERHEAD)
        self._sent.sealed(self._written, application, record_step(limit, framed))

    def _dropping(self, queued: int) -> None:
        """Our side is about to drop what the transport holds: the last ``queued`` bytes
        written. The first such drop says what left (a later one finds nothing left)."""
        if self.delivered is None:
            sent = self._sent
            self.delivered = (
                Delivery(0, True) if sent is None else sent.delivered(self._written - queued)
            )

    def reset(self, reason: str) -> None:
        """Reset the transport (TCP RST, no close_notify) and :meth:`abort` the stream;
        :attr:`delivered` says what of the application bytes had left (those whose
        records the peer acknowledged, as far as the system can say: see
        :func:`~qkdproxy.io.sendq.queued`)."""
        writer = self._driver.writer
        self._dropping(sendq.queued(writer, unacknowledged=True))
        sendq.reset(writer)
        self.abort(reason)

    async def _close_transport(self) -> None:
        """:func:`close_transport`, noting what a close cut short dropped."""
        await close_transport(self._driver.writer, dropping=self._dropping)

    def _queue_now(self, queue: Callable[[], None]) -> None:
        try:
            queue()
            self._transmit()
        except LocalProtocolError as exc:
            raise self._failed(TlsStreamError(exc.reason, exc.alert)) from None
        except ConnectionError as exc:
            raise self._failed(TlsStreamError(f"{type(exc).__name__}: {exc}")) from None

    def abort(self, reason: str) -> None:
        """The transport is being reset under the stream (no close_notify): an unfinished
        Extended Key Update failed and its key is settled; reads raise from now on."""
        self._layer.abort()
        if self.failure is None:
            self.failure = TlsStreamError(reason, truncated=True)

    async def _fail(self, error: TlsStreamError) -> TlsStreamError:
        failure = self._failed(error)
        await self._close_transport()
        return failure

    def _failed(self, error: TlsStreamError) -> TlsStreamError:
        """The stream failed (the transport is closed by the caller): what to raise."""
        self._layer.abort()  # a transport error leaves the record layer open otherwise
        # The first failure is the cause (an update's deadline, an alert); what other tasks
        # run into afterwards (a closed transport, a failed layer) is only its consequence.
        self.failure = self.failure or error
        with contextlib.suppress(TlsStreamError):
            self._transmit()  # our alert, if the record layer queued one
        return self.failure

    async def close(self, final: bytes = b"") -> None:
        """Send ``final`` (plaintext, if any) and close_notify, in one write (best effort),
        and close the transport."""
        try:
            if final and self.failure is None:
                with contextlib.suppress(LocalProtocolError):
                    self._layer.send_data(final, None)
            self._layer.close()
            with contextlib.suppress(TlsStreamError, ConnectionError, TimeoutError):
                self._transmit()
                writer = self._driver.writer
                if _waits(writer):
                    async with asyncio.timeout(CLOSE_TIMEOUT):
                        await writer.drain()
        finally:
            await self._close_transport()


def engine_spec(name: str, settings: EndpointSettings) -> EngineSpec:
    """The named handshake engine, prepared for the endpoint's credentials and groups.
    tlslite is imported only when chosen (its start-up self-test costs a handshake)."""
    if name == "native":
        return NativeEngineSpec.of(settings.credentials)
    if name == "tlslite":
        from qkdproxy.core.tls.tlslite_glue import TlsliteEngineSpec, install  # noqa: PLC0415

        install(g.group for g in settings.groups)
        return TlsliteEngineSpec.of(settings.credentials)
    raise SettingError(f"tls_engine must be one of {', '.join(ENGINES)}, not {name!r}")


class TlsEndpoint:
    """Runs client or server handshakes with one set of endpoint settings."""

    def __init__(self, settings: EndpointSettings) -> None:
        if not settings.groups:
            raise SettingError("an endpoint needs at least one key-exchange group")
        self.settings = settings
        alpn = [ALPN_PROTOCOL.encode()] if settings.peer_protocol else None
        self._config = ConnectionConfig(
            groups=settings.groups,
            peer=settings.peer,
            engine=engine_spec(settings.tls_engine, settings),
            server_name=_sni_name(settings.peer.server_name),
            alpn=alpn,
            handshake_timeout=settings.handshake_timeout,
            fresh_key_deadline=settings.fresh_key_deadline,
            fresh_key_update=settings.fresh_key_update,
            require_fresh_key_update=settings.require_fresh_key_update,
            spares=KeyPairReserve(),
        )
        # Multiplexing: servers accept qkdproxy-mux/1; clients offer it (first) only for
        # the tunnels of their pool, so a per-connection dial never gets it.
        self._mux_config = self._config
        if alpn is not None and settings.mux_protocol:
            mux_alpn = [MUX_ALPN_PROTOCOL.encode(), *alpn]
            self._mux_config = dataclasses.replace(self._config, alpn=mux_alpn)

    # connect and accept hand back the handshake's coroutine itself: a coroutine of their
    # own would only forward, one more frame for every step of every handshake.

    def connect(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        mux: bool = False,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> Coroutine[Any, Any, TlsStream]:
        """Client handshake over an open stream, to await; raises :class:`HandshakeError`.
        ``mux`` also offers qkdproxy-mux/1 (if the settings allow it); ``loop``: the
        running loop, if the caller holds it."""
        config = self._mux_config if mux else self._config
        # A pool's tunnels are rotated minutes apart: a spare made after one would be stale
        # (dropped unused) by the next, so only per-connection dials replenish.
        spares = None if mux else config.spares
        return self._run(True, Transport(reader, writer), config, loop, spares)

    def accept(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> Coroutine[Any, Any, TlsStream]:
        """Server handshake over an accepted stream, to await; raises
        :class:`HandshakeError`. ``loop``: the running loop, if the caller holds it."""
        return self._run(False, Transport(reader, writer), self._mux_config, loop)

    async def _run(
        self,
        is_client: bool,
        transport: Transport,
        config: ConnectionConfig,
        loop: asyncio.AbstractEventLoop | None,
        spares: KeyPairReserve | None = None,
    ) -> TlsStream:
        keys = self.settings.keys
        conn = TlsConnection(config, keys, is_client=is_client, wall_time=self.settings.clock())
        loop = loop or asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            complete = await _drive(conn, transport, keys, loop, spares)
        except BaseException:
            conn.abort()
            _close_streams(conn.next_events(), keys)
            await close_transport(transport.writer)
            raise
        if complete is None:
            _close_streams(conn.next_events(), keys)  # settled after a timeout, say
            try:
                with contextlib.suppress(OSError):  # TimeoutError included
                    async with asyncio.timeout(CLOSE_TIMEOUT):
                        await _flush(conn, transport.writer)  # our alert, if any
            finally:  # cut while our alert waits for the peer: the socket goes all the same
                await close_transport(transport.writer)
            assert conn.error is not None
            raise conn.error
        assert conn.records is not None
        stream = TlsStream(
            transport,
            SocketReader.attach(transport.reader, transport.writer, RECEIVE_BUFFER, loop),
            conn.records,
            complete.record,
            complete.peer,
            time.perf_counter() - started,
            complete.cipher,
            complete.alpn,
            _keys=keys,
        )
        if leftover := conn.take_leftover():
            stream._backlog = conn.records.receive(leftover, loop.time())
        if corked := conn.data_to_send():
            stream._corked = corked
            # Two rounds, not one: the tasks our caller starts in this round (a tunnel's
            # pump, reading what the application already sent) take their first step in
            # the next one, and may write first.
            loop.call_soon(loop.call_soon, stream._uncork)
        return stream


async def _drive(
    conn: TlsConnection,
    transport: Transport,
    keys: KeyContext,
    loop: asyncio.AbstractEventLoop,
    spares: KeyPairReserve | None = None,
) -> HandshakeComplete | None:
    """Run ``conn`` until its handshake completed (returned) or failed (None); ``spares``
    gets its next key pair once the hello has left."""
    now = loop.time()
    conn.start(now)
    if spares is not None:
        # Runs once this task waits for the server's answer: the hello has left.
        loop.call_soon(spares.replenish, now)
    deadline = conn.get_timer()
    assert deadline is not None
    try:
        # One timeout for the whole handshake: the connection's deadline, in loop time.
        async with aio.deadline(loop, deadline):
            return await _exchange(conn, transport, keys, loop)
    except TimeoutError:
        conn.handle_timer(deadline)
        return None


async def _exchange(
    conn: TlsConnection,
    transport: Transport,
    keys: KeyContext,
    loop: asyncio.AbstractEventLoop,
) -> HandshakeComplete | None:
    while True:
        request = None
        complete = None
        for event in conn.next_events():
            if isinstance(event, KeyNeeded):
                if isinstance(event.request, CloseStream):
                    close_later(keys, event.request.ksid)
                else:
                    request = event.request
            elif isinstance(event, HandshakeComplete):
                complete = event
        if conn.phase is Phase.FAILED:
            return None
        if complete is not None:
            return complete  # its last flight, if any, leaves with the first write
        try:
            await _flush(conn, transport.writer)
            if request is not None:
                conn.answer_key(await supply(request, keys), loop.time())
                continue
            data = await transport.reader.read(READ_CHUNK)
        except OSError:  # the transport broke (reset, broken pipe, host unreachable...)
            conn.transport_failed()
            continue
        if data:
            conn.receive_data(data, loop.time())
        else:
            conn.receive_eof(loop.time())


async def _flush(conn: TlsConnection, writer: asyncio.StreamWriter) -> None:
    if out := conn.data_to_send():
        transport = writer.transport  # as in TlsStream._transmit
        if transport.is_closing():
            # uvloop raises RuntimeError on a write to a closed transport.
            raise ConnectionResetError("transport already closed")
        transport.write(out)
        await writer.drain()


def _close_streams(events: Sequence[object], keys: KeyContext) -> None:
    for event in events:
        if isinstance(event, KeyNeeded) and isinstance(event.request, CloseStream):
            close_later(keys, event.request.ksid)


def _waits(writer: asyncio.StreamWriter) -> bool:
    """Whether the transport still holds bytes for the peer: only then can its drain or
    the end of its close wait on the peer (an empty one drains at once and, closed, is
    released in the loop's next round), so only then does either need a deadline."""
    return writer.transport.get_write_buffer_size() > 0


async def close_transport(
    writer: asyncio.StreamWriter, *, dropping: Callable[[int], None] | None = None
) -> None:
    """Close an asyncio stream and wait (bounded) until its socket is released.

    A close cut short (its time-out, a cancellation) aborts the transport: ``dropping``
    is told first how many bytes of it were still unacknowledged (its buffer, which the
    abort drops, and the socket's queue, which the kernel may yet deliver after the
    close: counted as lost, so what the caller reports is never more than what left).
    """
    writer.close()
    try:
        if not _waits(writer):
            # Nothing left to send, so nothing to wait for from the peer: no timeout scope
            # (each looks up the task and the loop, a getpid() each on Python 3.11, and
            # sets a timer), and closes come two or three a connection.
            await writer.wait_closed()
            return
        # A timeout scope, not wait_for: no task per close (Python 3.11 made one).
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await writer.wait_closed()
    except TimeoutError:
        # A peer that stops reading must not keep the socket (and its descriptor) alive.
        _abort(writer, dropping)
    except asyncio.CancelledError:
        # Cut while waiting (a daemon stopping now): the same, or the socket would stay
        # open, with what it still holds, for as long as the peer does not read it.
        _abort(writer, dropping)
        # Or an earlier close of this transport was cut: that cancelled the future every
        # wait_closed awaits, which raises at once since. Nobody stops this task then (a
        # failed stream's owner closing it again), and the close is done.
        task = asyncio.current_task()
        if task is None or task.cancelling():
            raise
    except Exception:  # noqa: S110 - the transport is being closed anyway
        pass


def _abort(writer: asyncio.StreamWriter, dropping: Callable[[int], None] | None) -> None:
    if dropping is not None:
        dropping(sendq.queued(writer, unacknowledged=True))
    writer.transport.abort()
