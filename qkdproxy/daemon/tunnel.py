"""A running tunnel: listeners, connection limit, handshakes, the pump, one log line each.

Client role: plaintext in, TLS to the peer daemon. Server role: TLS in, plaintext to the
backend. The TLS endpoint can be swapped (reload) without touching live connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from operator import attrgetter

from qkdproxy.core.addresses import (
    Address,
    SystemdAddress,
    TcpAddress,
    UnixAddress,
    format_sockname,
)
from qkdproxy.core.admission import Admission, AdmissionLimits, HelloState, Refusal, Ticket
from qkdproxy.core.logsafe import escape
from qkdproxy.core.mux import FRAME_SIZE, MUX_ALPN, MuxConnection
from qkdproxy.core.peer.frames import VERDICT_OK
from qkdproxy.core.policy import Policy
from qkdproxy.core.proxyv2 import ProxyInfo, encode_proxy_v2
from qkdproxy.core.ratelimit import source_key
from qkdproxy.core.throttle import LogThrottle
from qkdproxy.core.tls.wire import Alert
from qkdproxy.daemon import gate
from qkdproxy.daemon.config import TunnelConfig
from qkdproxy.daemon.logformat import log_record_event
from qkdproxy.daemon.muxconn import MuxStream, MuxStreamError, MuxTunnel, pump_stream
from qkdproxy.daemon.muxpool import STREAM_RETRIES, MuxPool, PlainTunnel
from qkdproxy.daemon.pump import (
    READ_SIZE,
    Channel,
    FreshKeyBudget,
    RawTlsChannel,
    RekeyBudget,
    Traffic,
    pump,
)
from qkdproxy.io import aio, socket_reader
from qkdproxy.io.peer_channel import PeerChannel, open_peer_channel
from qkdproxy.io.socket_reader import SocketReader
from qkdproxy.io.tls_stream import (
    FreshKeyStats,
    HandshakeError,
    Outcome,
    TlsEndpoint,
    TlsStream,
    close_transport,
)
from qkdproxy.keys.context import KeyContext
from qkdproxy.keys.responder import HELLO_SOURCE
from qkdproxy.keys.sources import (
    REFUSALS_BEFORE_FLUSH,
    FlushableSource,
    KeySources,
    is_flushable,
)

log = logging.getLogger("qkdproxy.connection")
IANA_CIPHERS = {
    "aes128gcm": "TLS_AES_128_GCM_SHA256",
    "aes256gcm": "TLS_AES_256_GCM_SHA384",
    "chacha20-poly1305": "TLS_CHACHA20_POLY1305_SHA256",
}
_ids = itertools.count(1)
# Connections that end on these are logged at WARNING, at most once per reason per interval
# (the line says how many similar ones came since); the others of the interval stay at INFO,
# so the one-line-per-connection record is complete and a flood is not a flood of warnings.
PROBLEM_REASONS = (
    "handshake failed", "rejected", "peer unreachable", "backend unreachable", "error",
)  # fmt: skip
WARNING_INTERVAL_S = 10.0
# Why a multiplexed tunnel established under settings a reload changed was retired.
RELOADED = "reloaded"


@dataclass(slots=True)
class ConnectionRecord:
    """The one structured log line written when a connection closes (never key material)."""

    conn_id: int
    tunnel: str
    role: str
    client: str = ""
    peer: str | None = None
    group: str | None = None
    flow: str | None = None
    api: str | None = None
    qkd_key_id: str | None = None
    # A failed handshake: the QKD key id it took (and so wasted), if any.
    spent_key_id: str | None = None
    hello_retry: bool = False
    fallback: bool = False
    failure: str | None = None
    handshake_ms: float | None = None
    bytes_to_peer: int = 0
    bytes_from_peer: int = 0
    key_updates: int = 0
    # Extended Key Updates: completed, failed, cut short by the connection's clean end, and
    # the QKD key ids the completed ones spent (never keys).
    fresh_key_updates: int = 0
    fresh_key_update_failures: int = 0
    fresh_key_updates_abandoned: int = 0
    fresh_key_ids: list[str] = field(default_factory=list)
    duration_s: float = 0.0
    reason: str = ""
    # Multiplexing: "tunnel" (a carrying tunnel's line) or "stream" (an application
    # connection it carried, with the tunnel's conn_id); streams carried by a tunnel.
    mux: str | None = None
    mux_tunnel: int | None = None
    mux_streams: int | None = None
    # A client's stream: how often it was sent again because the server did not process it.
    mux_retries: int | None = None

    def take_fresh_keys(self, stats: FreshKeyStats) -> None:
        """Copy what the connection's Extended Key Updates did into this line."""
        self.fresh_key_updates, self.fresh_key_update_failures = stats.completed, stats.failed
        self.fresh_key_updates_abandoned = stats.abandoned
        self.fresh_key_ids = stats.key_ids

    @property
    def spends_key(self) -> bool:
        """Whether this line is where a QKD key's spending is recorded (a stream's key id is
        its tunnel's, recorded on the tunnel's line)."""
        if self.mux == "stream":
            return False
        return bool(self.qkd_key_id or self.spent_key_id or self.fresh_key_ids)


RECORD_FIELDS = tuple(f.name for f in dataclass_fields(ConnectionRecord))
# The line's values in RECORD_FIELDS order, in one C call (a shallow copy: asdict deep-copies).
_record_values = attrgetter(*RECORD_FIELDS)


@dataclass(slots=True)
class TunnelStats:
    """Counters read by the status endpoint and the demo."""

    opened: int = 0
    closed: int = 0
    rejected_at_limit: int = 0
    handshake_failures: int = 0
    fallbacks: int = 0
    # qkd-preferred fallbacks by reason (see fallback_reason).
    fallback_reasons: dict[str, int] = field(default_factory=dict)
    # Plaintext bytes of closed connections (live ones: Tunnel.bytes_moved).
    bytes_to_peer: int = 0
    bytes_from_peer: int = 0
    # Recent handshake durations only (for the demo's median): bounded.
    handshake_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=1024))


class Tunnel:
    """One configured tunnel; ``endpoint`` (and ``fallback``) are replaceable on reload."""

    def __init__(
        self,
        config: TunnelConfig,
        endpoint: TlsEndpoint,
        keys: KeyContext,
        fallback: TlsEndpoint | None = None,
        *,
        on_close: Callable[[ConnectionRecord], None] | None = None,
        on_handshake: Callable[[ConnectionRecord], None] | None = None,
    ) -> None:
        self.config = config
        self.endpoint = endpoint
        self.fallback = fallback
        self.keys = keys
        self.stats = TunnelStats()
        self._on_close = on_close
        self._on_handshake = on_handshake
        self._servers: list[asyncio.Server] = []
        self._connections: set[asyncio.Task[None]] = set()
        # wait_idle's callers, woken when the last connection ends (a future each: no lock
        # taken and released by every connection to tell nobody).
        self._idle_waiters: list[asyncio.Future[None]] = []
        # Why qkd-preferred connections currently fall back (None: QKD works).
        self._fallback_state: str | None = None
        self._warnings = LogThrottle(WARNING_INTERVAL_S)
        self._traffic: dict[int, Traffic] = {}
        # Admission control: counts survive a reload, limits follow the configuration.
        self.admission = Admission(admission_limits(config))
        self._admitted_config = config
        self._tickets: dict[int, Ticket] = {}
        self._refusal_log = LogThrottle(config.refusal_log_interval_s)
        # Multiplexing: the client's pool; the server's carrying tunnels (drained on stop).
        self.pool: MuxPool | None = None
        self._mux_tunnels: set[MuxTunnel] = set()
        self._pool_tasks: set[asyncio.Future[None]] = set()
        self._live_streams = 0
        # Bumped by each reload that changed the trust (see reconfigure): a server's
        # handshake that began before one authenticated its peer under the old trust.
        self._trust_epoch = 0
        # Set once the listeners closed: a tunnel established after that drains at once.
        self._stopping = False
        # The loop the tunnel was started on, held for each connection's tasks and
        # deadlines (a look-up costs a getpid() on Python 3.11).
        self._started_on: asyncio.AbstractEventLoop | None = None
        # The key-update budgets, made once per configuration rather than per connection.
        self._budgets_of: TunnelConfig | None = None
        self._budgets = (RekeyBudget(), FreshKeyBudget())

    @property
    def active(self) -> int:
        """Connections in progress (a server's streams of multiplexed tunnels included)."""
        return len(self._connections) + self._live_streams

    @property
    def sources(self) -> KeySources:
        """The key sources of this tunnel."""
        return self.keys.sources

    # ------------------------------------------------------------- listening

    async def start(self, inherited: dict[str, list[socket.socket]] | None = None) -> None:
        """Open the listener(s) (and, for a multiplexing client, its tunnel pool)."""
        self._started_on = asyncio.get_running_loop()
        if self.config.role == "client" and self.config.mux.enabled and self.pool is None:
            self.pool = MuxPool(
                self.config.mux, self._dial_mux, wait_s=self.config.connect_timeout_s
            )
            self.pool.start()
        address = self.config.listen
        handler = self._accept
        # Only a server's listener receives TLS hellos (and has their deadlines); a
        # client's is plaintext, read in place (a stream reads at most a frame at once).
        plain = None
        if self.config.role == "client":
            plain = FRAME_SIZE if self.pool is not None else READ_SIZE
        if isinstance(address, TcpAddress):
            self._servers.append(
                await gate.start_server(
                    handler, plaintext_read_size=plain, host=address.host, port=address.port
                )
            )
        elif isinstance(address, UnixAddress):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(address.path)
            self._servers.append(
                await gate.start_unix_server(handler, address.path, plaintext_read_size=plain)
            )
        else:
            sockets = (inherited or {}).get(address.name)
            if not sockets:
                raise OSError(f"no socket named {address.name!r} was passed by systemd")
            for sock in sockets:
                self._check_inherited(sock)
                self._servers.append(
                    await gate.start_server(handler, plaintext_read_size=plain, sock=sock)
                )

    def _loop(self) -> asyncio.AbstractEventLoop:
        """The running loop: the one the tunnel was started on, if it was."""
        return self._started_on or asyncio.get_running_loop()

    def _check_inherited(self, sock: socket.socket) -> None:
        # The configuration could not see where systemd bound the socket: check now.
        if self.config.role != "client" or self.config.allow_public_plaintext:
            return
        name = sock.getsockname()
        if isinstance(name, tuple) and not TcpAddress(str(name[0]), int(name[1])).loopback:
            raise OSError(
                f"tunnel {self.config.name}: the inherited plaintext socket {name[0]} is not "
                "loopback (set allow_public_plaintext)"
            )

    def bound(self) -> list[str]:
        """Where the tunnel listens (resolved ports), for logs and tests."""
        out = []
        for server in self._servers:
            for sock in server.sockets:
                out.append(format_sockname(sock.getsockname()))
        return out

    async def wait_idle(self) -> None:
        """Return once no connection is in progress."""
        while self._connections:  # a connection may have begun since the wake-up
            idle = self._loop().create_future()
            self._idle_waiters.append(idle)
            await idle

    def stop_accepting(self) -> None:
        """Close the listeners; live connections continue."""
        self._stopping = True
        for server in self._servers:
            server.close()
        if self.pool is not None:
            self.pool.stop()
        for tunnel in self._mux_tunnels:
            self._drain_mux(tunnel)

    def reconfigure(
        self,
        config: TunnelConfig,
        endpoint: TlsEndpoint,
        fallback: TlsEndpoint | None,
        keys: KeyContext,
    ) -> None:
        """Apply a reload: new handshakes use ``endpoint`` and ``keys``; connections and
        streams already open keep what they were established with. A multiplexed tunnel
        established under another trust (CA bundle, certificate policy, or a client's peer
        address or name), or whose peer the new allow-list refuses on a client, takes no
        new stream: a client's pool retires it (the next connection establishes a tunnel
        that meets the new settings), a server sends GOAWAY on it (its peer sends its new
        streams on such a tunnel). A server's allow-list is checked per stream instead."""
        trusted = _trust(self.config, self.endpoint) == _trust(config, endpoint)
        self.config, self.endpoint, self.fallback, self.keys = config, endpoint, fallback, keys
        self._trust_epoch += not trusted
        if self.pool is not None:
            allow = endpoint.settings.peer.allow
            self.pool.reconfigured(lambda t: not trusted or not allow.permits(t.tls.peer), RELOADED)
        if not trusted:
            for tunnel in self._mux_tunnels:
                if not tunnel.draining:  # one GOAWAY and one drain each, however many reloads
                    self._drain_mux(tunnel, RELOADED)

    def _drain_mux(self, tunnel: MuxTunnel, why: str = "closed") -> None:
        """GOAWAY at once: the peer's pool sends new streams elsewhere (those it opened
        meanwhile are refused unprocessed, and it sends them again). The tunnel ends once
        its streams did."""
        tunnel.stop_streams()
        draining = asyncio.ensure_future(tunnel.drain(why))
        self._pool_tasks.add(draining)
        draining.add_done_callback(self._pool_tasks.discard)

    async def drain(self, timeout_s: float) -> int:
        """Wait up to ``timeout_s`` for live connections, then cut the rest; how many were
        cut."""
        pending: set[asyncio.Task[None]] = set()
        # A pool's establishment in progress finishes within the same deadline.
        maintainer = self.pool.maintainer if self.pool is not None else None
        waiting = {*self._connections, *([maintainer] if maintainer is not None else [])}
        if waiting:
            _, pending = await asyncio.wait(waiting, timeout=timeout_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()
        if self.pool is not None:
            await self.pool.close()
        return len(pending - {maintainer})

    # ------------------------------------------------------------ connections

    async def _accept(
        self, reader: asyncio.StreamReader | SocketReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task(self._started_on)
        assert task is not None
        record = ConnectionRecord(next(_ids), self.config.name, self.config.role)
        peername = writer.get_extra_info("peername")
        record.client = str(peername[0]) if isinstance(peername, tuple) else "unix"
        # SO_KEEPALIVE came from the listening socket (gate.start_server).
        ticket = self._admit(record, writer)
        if ticket is None:
            return
        self._tickets[record.conn_id] = ticket
        self._connections.add(task)
        self.stats.opened += 1
        started = time.monotonic()
        try:
            # A server's listener watches hellos (stream readers); a client's is read in place.
            if self.config.role == "server" and isinstance(reader, asyncio.StreamReader):
                work = self._serve_server(reader, writer, record)
            else:
                work = self._serve_client(reader, writer, record)
            record.reason = await self._within_lifetime(work)
        finally:
            self._connections.discard(task)
            self.admission.release(self._tickets.pop(record.conn_id))
            # Cut again while closing (a second SIGTERM cancels the drain and the closes
            # it waits for; the close aborted the socket): the line is still written (it
            # may say where a key went), and the task ends quietly like any cut connection.
            with contextlib.suppress(asyncio.CancelledError):
                await close_transport(writer)
            self._finish(record, started, quiet_as=self._quiet_as(record, reader))
            if not self._connections:
                self._wake_idle()

    def _wake_idle(self) -> None:
        waiters, self._idle_waiters = self._idle_waiters, []
        for idle in waiters:
            if not idle.done():  # a waiter cancelled meanwhile is done already
                idle.set_result(None)

    async def _within_lifetime(self, work: Coroutine[object, object, str]) -> str:
        """Run one connection's work; why it ended (its lifetime, a drain, an error too)."""
        lifetime = self.config.max_lifetime_s
        try:
            if not lifetime:  # no limit: no timeout scope (one per connection and stream)
                return await work
            async with asyncio.timeout(lifetime):
                return await work
        except TimeoutError:
            return "max_lifetime"
        except asyncio.CancelledError:
            # Cut by the drain deadline: end quietly (re-raising only makes asyncio log a
            # traceback for every connection).
            return "drained"
        except Exception as exc:
            # Whatever one connection hits ends that connection only.
            return f"error: {type(exc).__name__}: {exc}"[:300]

    def _admit(self, record: ConnectionRecord, writer: asyncio.StreamWriter) -> Ticket | None:
        """Admission control: a ticket, or None once the connection was reset (no TLS
        work, no KME call) and the refusal counted and (throttled) logged."""
        if self.config is not self._admitted_config:  # reloaded
            self._admitted_config = self.config
            self.admission.update(admission_limits(self.config))
            self._refusal_log.interval_s = self.config.refusal_log_interval_s
        now = time.monotonic()
        # A multiplexing client's connections ride established tunnels: no handshake each.
        pooled = self.pool is not None
        verdict = self.admission.admit(source_key(record.client), now, handshake=not pooled)
        if isinstance(verdict, Ticket):
            return verdict
        if verdict is Refusal.CONNECTION_LIMIT:
            self.stats.rejected_at_limit += 1
            record.reason = "rejected: connection limit"
        else:
            record.reason = f"rejected: {verdict.value}"
        gate.reset(writer)
        self._finish(record, now, opened=False, quiet_as=verdict.value)
        return None

    def _quiet_as(
        self, record: ConnectionRecord, reader: asyncio.StreamReader | SocketReader
    ) -> str | None:
        """The throttle reason of a server connection that failed before its ClientHello
        was complete (an unauthenticated source can produce those at will); None when the
        connection deserves its own log line."""
        if self.config.role != "server" or record.failure is None:
            return None
        hello = reader.hello.state if isinstance(reader, gate.WatchedReader) else None
        return f"before_hello:{record.failure}" if hello is not HelloState.COMPLETE else None

    async def _serve_client(
        self,
        reader: asyncio.StreamReader | SocketReader,
        writer: asyncio.StreamWriter,
        record: ConnectionRecord,
    ) -> str:
        got: MuxStream | PlainTunnel | None = None
        if self.pool is not None:
            try:
                got = await self.pool.open()
            except HandshakeError as exc:
                if self.fallback is None or not exc.may_be_kme:
                    return self._handshake_failed(exc, record)
                # qkd-preferred and our KME failed: this connection falls back on its own
                # (the per-connection path below), the pool retries with backoff.
            except TimeoutError:  # an OSError too: first
                return "rejected: no stream available in time"
            except OSError as exc:
                return f"peer unreachable: {exc.strerror or type(exc).__name__}"
            except MuxStreamError as exc:
                return f"rejected: {exc}"[:300]
        if isinstance(got, MuxStream):
            return await self._pump_stream(reader, writer, got, record)
        if got is not None:
            self._established(got.stream, record)
            return await self._pump_client(reader, writer, record, got.stream, got.writer)
        try:
            stream, peer_writer = await self._dial_with_fresh_key(record)
        except HandshakeError as exc:
            if self.fallback is None or not exc.may_be_kme:
                return self._handshake_failed(exc, record)
            self._fall_back(exc)
            record.fallback = True
            try:
                stream, peer_writer = await self._dial_peer(self.fallback, record)
            except HandshakeError as again:
                return self._handshake_failed(again, record)
        except OSError as exc:
            return f"peer unreachable: {exc.strerror or type(exc).__name__}"
        if not record.fallback:
            self._qkd_back()
        self._established(stream, record)
        return await self._pump_client(reader, writer, record, stream, peer_writer)

    async def _pump_client(
        self,
        reader: asyncio.StreamReader | SocketReader,
        writer: asyncio.StreamWriter,
        record: ConnectionRecord,
        stream: TlsStream,
        peer_writer: asyncio.StreamWriter,
    ) -> str:
        try:
            channel = await self._peer_channel(stream)
        except asyncio.CancelledError:
            # Cut while announcing (the peer does not read): nothing else holds the peer's
            # socket (a failed write closed it already).
            peer_writer.transport.abort()
            raise
        traffic = self._live(record)
        reason: str | None = None
        try:
            reason = await pump(
                reader, writer, channel, traffic,
                idle_timeout_s=self.config.idle_timeout_s, rekey=self._rekey,
                fresh=self._fresh, stream=stream, fin_with_close=True, loop=self._loop(),
            )  # fmt: skip
            return reason
        finally:
            try:
                await self._closing(record, traffic, _close_after_pump(
                    reason, traffic, channel, tls=peer_writer, plaintext=writer,
                    unsent=_unsent(reader),
                ))  # fmt: skip
            finally:  # an update our close cut short (the close itself cut, too)
                record.take_fresh_keys(stream.fresh_key_stats())

    async def _dial_with_fresh_key(
        self, record: ConnectionRecord, *, mux: bool = False
    ) -> tuple[TlsStream, asyncio.StreamWriter]:
        """Dial with the main endpoint. If the peer refuses the QKD key (or ETSI 004 stream)
        we offered because its end does not know it (the peer or a KME restarted), flush
        what we hold ahead and dial once more with a key taken now."""
        held = self._held_ahead()
        epoch = held.buffer_epoch if held is not None else 0
        try:
            dialled = await self._dial_peer(self.endpoint, record, mux=mux)
        except HandshakeError as exc:
            if held is None or not _refused(exc, held):
                raise
            self.keys.ledger.reclassify_refused()
            # Flushed now, or by a concurrent handshake since this one began.
            if not (held.flush_after_refusal() or held.buffer_epoch != epoch):
                raise
            log.warning(
                "tunnel %s: the peer refused our QKD keys %d times in a row (%s); the peer "
                "or a KME may have restarted: key supply flushed, retrying once",
                self.config.name, REFUSALS_BEFORE_FLUSH, escape(exc.reason),
            )  # fmt: skip
            dialled = await self._dial_peer(self.endpoint, record, mux=mux)
        if held is not None and dialled[0].record.offered_key_id is not None:
            held.note_accepted()
        return dialled

    def _fall_back(self, exc: HandshakeError) -> None:
        """Count a qkd-preferred fallback; log at WARNING only when the reason changes."""
        reason = fallback_reason(exc)
        self.stats.fallbacks += 1
        self.stats.fallback_reasons[reason] = self.stats.fallback_reasons.get(reason, 0) + 1
        if self._fallback_state != reason:
            self._fallback_state = reason
            log.warning(
                "tunnel %s: QKD unavailable (%s: %s); falling back to %s until it works again",
                self.config.name, reason, exc.reason,
                "/".join(g.name for g in self.config.plan.fallback),
            )  # fmt: skip

    def _qkd_back(self) -> None:
        if self._fallback_state is not None:
            self._fallback_state = None
            log.warning("tunnel %s: QKD available again; no more fallback", self.config.name)

    def _held_ahead(self) -> FlushableSource | None:
        """The source whose keys or streams this side originates ahead of use, if any."""
        for source in (self.sources.master, self.sources.stream):
            if is_flushable(source):
                return source
        return None

    async def _dial_peer(
        self, endpoint: TlsEndpoint, record: ConnectionRecord, *, mux: bool = False
    ) -> tuple[TlsStream, asyncio.StreamWriter]:
        peer = self.config.connect
        assert isinstance(peer, TcpAddress)
        loop = self._loop()
        async with aio.deadline(loop, loop.time() + self.config.connect_timeout_s):
            peer_reader, peer_writer = await aio.open_connection(loop, peer.host, peer.port)
        gate.keep_dialled_alive(peer_writer)
        return await endpoint.connect(peer_reader, peer_writer, mux=mux, loop=loop), peer_writer

    async def _serve_server(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, record: ConnectionRecord
    ) -> str:
        # Until the client is authenticated, KME work for the KSID it names is bounded.
        HELLO_SOURCE.set(source_key(record.client))
        epoch = self._trust_epoch
        try:
            loop = self._loop()
            stream = await gate.within_hello_deadlines(
                reader, self.endpoint.accept(reader, writer, loop=loop),
                self.config.first_byte_timeout_s, self.config.hello_timeout_s, loop,
            )  # fmt: skip
        except gate.HelloDeadlineError as exc:
            self.admission.count(exc.refusal)
            self.stats.handshake_failures += 1
            record.failure = exc.refusal.value
            return f"handshake failed (peer): {exc.refusal.value}"
        except HandshakeError as exc:
            master = self.sources.master
            if is_flushable(master) and _refused(exc, master):
                # Server-initiated flow: the client refused our key. The server's supply is
                # never announced (no peer restart can make it suspect) and the refusal is
                # unauthenticated: it costs this one key, never a flush.
                self.keys.ledger.reclassify_refused()
            return self._handshake_failed(exc, record)
        self._established(stream, record)
        if stream.alpn == MUX_ALPN and self.config.mux.enabled:
            return await self._serve_mux_tunnel(stream, writer, record, epoch)
        channel = await self._peer_channel(stream)
        try:
            backend_reader, backend_writer = await self._open_backend()
        except (OSError, TimeoutError) as exc:
            why = _unreachable(exc)
            if isinstance(channel, PeerChannel):
                # The peer is authenticated: tell it why (qkdproxy probe reports it).
                with contextlib.suppress(ConnectionError):
                    await channel.send_verdict(why)
            await channel.close()
            return why
        if isinstance(channel, PeerChannel):
            channel.probe_answer = VERDICT_OK
        traffic = self._live(record)
        reason: str | None = None
        try:
            if self.config.proxy_protocol:
                # Inside the try: a header that cannot be encoded must not leak the backend.
                backend_writer.write(encode_proxy_v2(self._proxy_info(writer, stream, record)))
            # Seen from the server tunnel, the backend is the plaintext side.
            reason = await pump(
                backend_reader, backend_writer, channel, traffic,
                idle_timeout_s=self.config.idle_timeout_s, rekey=self._rekey,
                fresh=self._fresh, stream=stream, fin_with_close=True, loop=self._loop(),
            )  # fmt: skip
            return reason
        finally:
            try:
                await self._closing(record, traffic, _close_after_pump(
                    reason, traffic, channel, tls=writer, plaintext=backend_writer,
                    unsent=backend_reader.buffered,
                ))  # fmt: skip
            finally:  # cut again while closing: the backend's socket goes all the same
                record.take_fresh_keys(stream.fresh_key_stats())  # an update our close cut short
                await close_transport(backend_writer)

    # ------------------------------------------------------------ multiplexing

    async def _dial_mux(self) -> MuxTunnel | PlainTunnel:
        """Client pool: establish one tunnel (it gets its own log line when it ends)."""
        record = ConnectionRecord(next(_ids), self.config.name, self.config.role, mux="tunnel")
        record.client = "pool"
        started = time.monotonic()
        try:
            stream, peer_writer = await self._dial_with_fresh_key(record, mux=True)
        except (HandshakeError, OSError) as exc:
            if isinstance(exc, HandshakeError):
                record.reason = self._handshake_failed(exc, record)
            else:
                record.reason = f"peer unreachable: {exc.strerror or type(exc).__name__}"
            self._finish(record, started, opened=False)
            raise
        if stream.alpn != MUX_ALPN:
            # An older qkdproxy, or multiplex off at the peer: this stream serves the
            # connection that asked, the per-connection way (its own line says so).
            return PlainTunnel(stream, peer_writer)
        self._established(stream, record, admitted=False)
        tunnel = self._mux_tunnel(stream, peer_writer, record, on_stream=None)
        task = asyncio.ensure_future(self._carry(tunnel, record, started))
        self._pool_tasks.add(task)
        task.add_done_callback(self._pool_tasks.discard)
        return tunnel

    def _mux_tunnel(
        self,
        stream: TlsStream,
        writer: asyncio.StreamWriter,
        record: ConnectionRecord,
        on_stream: Callable[[MuxStream], None] | None,
    ) -> MuxTunnel:
        mux = self.config.mux
        conn = MuxConnection(client=on_stream is None, max_streams=mux.max_streams)
        tunnel = MuxTunnel(
            stream, writer, conn, keepalive_s=mux.keepalive_s, rekey=self._rekey,
            fresh=self._fresh, on_stream=on_stream,
        )  # fmt: skip
        tunnel.conn_id = record.conn_id
        tunnel.start()
        return tunnel

    async def _carry(self, tunnel: MuxTunnel, record: ConnectionRecord, started: float) -> None:
        """Wait for a pooled tunnel to end, then write its line."""
        try:
            record.reason = await tunnel.wait()
        finally:
            self._tunnel_ended(tunnel, record)
            self._finish(record, started, opened=False)

    def _tunnel_ended(self, tunnel: MuxTunnel, record: ConnectionRecord) -> None:
        record.mux_streams = tunnel.streams_carried
        record.key_updates = tunnel.key_updates
        record.take_fresh_keys(tunnel.tls.fresh_key_stats())
        if tunnel.broken and record.reason and not record.reason.startswith("error"):
            record.reason = f"error: {record.reason}"[:300]

    async def _serve_mux_tunnel(
        self,
        stream: TlsStream,
        writer: asyncio.StreamWriter,
        record: ConnectionRecord,
        epoch: int,
    ) -> str:
        """Server: carry the peer's streams until the tunnel ends (``epoch``: the trust
        its handshake began under)."""
        record.mux = "tunnel"
        tasks: set[asyncio.Task[None]] = set()

        def on_stream(mux: MuxStream) -> None:
            task = asyncio.ensure_future(self._serve_stream(mux, stream, writer, record))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        tunnel = self._mux_tunnel(stream, writer, record, on_stream)
        self._mux_tunnels.add(tunnel)
        if self._stopping:
            # Its handshake was under way when the listeners closed: GOAWAY right behind
            # the SETTINGS, so the peer's pool opens no stream on it.
            self._drain_mux(tunnel)
        elif epoch != self._trust_epoch:
            # Its peer was authenticated under a trust a reload changed meanwhile.
            self._drain_mux(tunnel, RELOADED)
        try:
            return await tunnel.wait()
        finally:
            self._mux_tunnels.discard(tunnel)
            try:
                await tunnel.close()  # cut (drain deadline, lifetime): open streams are reset
                await asyncio.gather(*tasks, return_exceptions=True)
            finally:  # cut again while closing: the line still says what the tunnel spent
                self._tunnel_ended(tunnel, record)

    async def _serve_stream(
        self,
        mux: MuxStream,
        stream: TlsStream,
        writer: asyncio.StreamWriter,
        carrier: ConnectionRecord,
    ) -> None:
        """Server: one application connection inside a tunnel, with its own line."""
        record = self._stream_record(carrier)
        self.stats.opened += 1
        self._live_streams += 1
        started = time.monotonic()
        try:
            work = self._stream_to_backend(mux, stream, writer, record)
            record.reason = await self._within_lifetime(work)
        finally:
            self._live_streams -= 1
            try:
                if not mux.done:
                    await mux.reset()
            finally:  # cut again while resetting: the line is still written
                self._finish(record, started)

    def _stream_record(self, carrier: ConnectionRecord) -> ConnectionRecord:
        """A stream's line: the carrier's peer and key, its own id and counts."""
        # A copy then the stream's own values: dataclasses.replace() costs five times more.
        record = ConnectionRecord(*_record_values(carrier))
        record.conn_id, record.mux, record.mux_tunnel = next(_ids), "stream", carrier.conn_id
        record.handshake_ms, record.hello_retry, record.failure = None, False, None
        record.reason = ""
        return record

    async def _stream_to_backend(
        self,
        mux: MuxStream,
        stream: TlsStream,
        writer: asyncio.StreamWriter,
        record: ConnectionRecord,
    ) -> str:
        # The allow-list is checked per stream too: a reload that drops this peer stops
        # new streams on tunnels it established before.
        if not self._permits(mux.tunnel, stream):
            await mux.tunnel.refuse(mux, 403)
            return "rejected: peer not allowed"
        if mux.error is not None:
            # Reset by the peer before we got to it (open-then-reset): no backend dial.
            return f"error: {mux.error}"
        try:
            backend_reader, backend_writer = await self._open_backend()
        except (OSError, TimeoutError) as exc:
            await mux.tunnel.refuse(mux, 502)
            return _unreachable(exc)
        traffic = self._live(record)
        reason: str | None = None
        try:
            mux.tunnel.accept(mux)
            if self.config.proxy_protocol:
                backend_writer.write(encode_proxy_v2(self._proxy_info(writer, stream, record)))
            reason = await pump_stream(
                backend_reader, backend_writer, mux, traffic,
                idle_timeout_s=self.config.idle_timeout_s,
            )  # fmt: skip
            return reason
        finally:
            unsent = backend_reader.buffered
            try:
                await self._closing(
                    record, traffic, _close_stream(reason, traffic, mux, backend_writer, unsent)
                )
            finally:  # cut again while closing: the backend's socket goes all the same
                await close_transport(backend_writer)

    def _permits(self, tunnel: MuxTunnel, stream: TlsStream) -> bool:
        """The allow-list's verdict on a tunnel's peer: worked out once per tunnel and
        list, not per stream (the peer and the list are immutable)."""
        allow = self.endpoint.settings.peer.allow
        verdict = tunnel.allow_verdict
        if verdict is None or verdict[0] is not allow:
            verdict = tunnel.allow_verdict = (allow, allow.permits(stream.peer))
        return verdict[1]

    async def _pump_stream(
        self,
        reader: asyncio.StreamReader | SocketReader,
        writer: asyncio.StreamWriter,
        mux: MuxStream,
        record: ConnectionRecord,
    ) -> str:
        """Client: one application connection through a pooled tunnel's stream; a stream
        the server did not process is sent again (at most STREAM_RETRIES times) on the
        stream the pool gives next, with the bytes it carried."""
        self.admission.handshake_done(self._tickets[record.conn_id])
        record.mux = "stream"
        retries = record.mux_retries = 0
        # Attached once: every attempt reads the application from the same buffer.
        source = SocketReader.attach(reader, writer, FRAME_SIZE)
        traffic = self._live(record)
        reason: str | None = None
        try:
            while True:
                _describe_stream(record, mux.tunnel)
                reason = await pump_stream(
                    source, writer, mux, traffic, idle_timeout_s=self.config.idle_timeout_s
                )
                kept = mux.kept()
                if kept is None:
                    break
                if retries >= STREAM_RETRIES:
                    reason = (
                        f"error: not processed by the peer ({mux.unprocessed}) "
                        f"after {retries + 1} attempts"
                    )
                    break
                again = await self._retry_stream(mux, *kept)
                kept = None  # sent by the new stream: not held for the connection's life
                if isinstance(again, str):
                    reason = again
                    break
                mux = again
                retries = record.mux_retries = retries + 1
            if mux.refused is not None and not traffic.from_peer:
                # Refused before anything came back (not allowed, backend down): the
                # application sees the close a refused handshake gives, not a reset.
                reason = f"rejected: {mux.error}"
            return reason
        finally:
            closing = _close_stream(reason, traffic, mux, writer, source.buffered)
            await self._closing(record, traffic, closing)

    async def _retry_stream(self, failed: MuxStream, data: bytes, fin: bool) -> MuxStream | str:
        """A stream of the pool (as a new connection would get) loaded with what ``failed``
        carried; or why there is none (the line's reason)."""
        await failed.reset()  # closed already: only leaves its tunnel
        why = f"error: not processed by the peer ({failed.unprocessed}), no retry: "
        assert self.pool is not None
        try:
            got = await self.pool.open()
        except (HandshakeError, OSError, MuxStreamError) as exc:  # TimeoutError: OSError
            return f"{why}{type(exc).__name__}: {exc}"[:300]
        if not isinstance(got, MuxStream):
            if got is not None:
                await got.stream.close()
            return f"{why}the peer no longer multiplexes"
        got.preload(data, fin)
        return got

    async def _open_backend(self) -> tuple[SocketReader, asyncio.StreamWriter]:
        loop = self._loop()
        async with aio.deadline(loop, loop.time() + self.config.connect_timeout_s):
            return await _open(self.config.connect, loop)

    def _established(
        self, stream: TlsStream, record: ConnectionRecord, *, admitted: bool = True
    ) -> None:
        """Account a completed handshake and fill the connection's line from it."""
        HELLO_SOURCE.set(None)  # authenticated: its announcements are not a hello's
        if admitted:
            self.admission.handshake_done(self._tickets[record.conn_id])
        self.stats.handshake_seconds.append(stream.handshake_seconds)
        record.handshake_ms = round(stream.handshake_seconds * 1000, 3)
        # A certificate name can be as long as the peer's CA signs: the line gets a cut one.
        record.peer = escape(stream.peer.describe())
        record.group = stream.record.group
        record.flow = stream.record.flow.value if stream.record.flow else None
        record.api = stream.record.api.value if stream.record.api else None
        record.qkd_key_id = stream.record.qkd_key_id
        record.hello_retry = stream.record.hello_retry
        server = self.config.role == "server"
        if server and self.config.policy is Policy.QKD_PREFERRED and stream.record.api is None:
            # No QKD key in this connection: on a qkd-preferred server that is the client's
            # fallback, and the line must say so (the server never falls back by itself).
            record.fallback = True
            self.stats.fallbacks += 1
        if self._on_handshake is not None:
            self._on_handshake(record)

    async def _peer_channel(self, stream: TlsStream) -> Channel:
        # The sources the handshake drew from: a reload that repointed the tunnel while it
        # ran must not have the old peer told (and fetch) the new peer's next keys.
        keys = stream.keys or self.keys
        channel = await open_peer_channel(stream, keys.sources)
        return channel if channel is not None else RawTlsChannel(stream)

    @staticmethod
    def _proxy_info(
        writer: asyncio.StreamWriter, stream: TlsStream, record: ConnectionRecord
    ) -> ProxyInfo:
        def address(name: object) -> tuple[str, int] | None:
            return (str(name[0]), int(name[1])) if isinstance(name, tuple) else None

        return ProxyInfo(
            source=address(writer.get_extra_info("peername")),
            destination=address(writer.get_extra_info("sockname")),
            connection_id=record.conn_id,
            peer_identity=stream.peer.describe(),
            peer_cn=stream.peer.common_name,
            cipher=IANA_CIPHERS.get(stream.cipher, stream.cipher),
            group=stream.record.group,
        )

    @property
    def _rekey(self) -> RekeyBudget:
        return self._budgets_now()[0]

    @property
    def _fresh(self) -> FreshKeyBudget:
        return self._budgets_now()[1]

    def _budgets_now(self) -> tuple[RekeyBudget, FreshKeyBudget]:
        """The budgets of the current configuration (a reload replaces it whole)."""
        config = self.config
        if self._budgets_of is not config:
            self._budgets_of = config
            self._budgets = (
                RekeyBudget(config.rekey_bytes, config.rekey_interval_s),
                FreshKeyBudget(config.fresh_key_bytes, config.fresh_key_interval_s),
            )
        return self._budgets

    def fresh_key_age(self) -> float | None:
        """Seconds since the oldest live connection with Extended Key Update got its last
        fresh key (None if there is none)."""
        now = time.monotonic()
        ages = [now - t.fresh_keys_at for t in self._traffic.values() if t.fresh_keys_at]
        return max(ages, default=None)

    def _live(self, record: ConnectionRecord) -> Traffic:
        """A connection's byte counts, visible to :meth:`bytes_moved` while it lives."""
        traffic = self._traffic[record.conn_id] = Traffic()
        return traffic

    async def _closing(
        self, record: ConnectionRecord, traffic: Traffic, close: Awaitable[None]
    ) -> None:
        """Close a connection's sides, then account its bytes (however the close ends): a
        reset in the close drops what the plaintext side had not received yet, and the
        line must not count it."""
        try:
            await close
        finally:
            self._account(record, traffic)

    def _account(self, record: ConnectionRecord, traffic: Traffic) -> None:
        delivered = traffic.delivered
        record.bytes_to_peer = traffic.to_peer
        if delivered is not None:
            # At most to_peer: a batch whose write failed (the transport broke: nothing
            # says what it dropped) or was cut is not counted, as it was not before.
            record.bytes_to_peer = min(traffic.to_peer, delivered.count)
        if delivered is not None and not delivered.exact:
            log.info(
                "connection %d: bytes_to_peer is a lower bound: the reset dropped more than "
                "its record ledger covers", record.conn_id,
            )  # fmt: skip
        record.bytes_from_peer = traffic.from_peer - traffic.dropped
        record.key_updates = traffic.key_updates
        record.take_fresh_keys(traffic.fresh_keys)
        # Moved from live to closed in one step: the sum bytes_moved() reports never drops.
        del self._traffic[record.conn_id]
        self.stats.bytes_to_peer += traffic.to_peer
        self.stats.bytes_from_peer += traffic.from_peer

    def bytes_moved(self) -> tuple[int, int]:
        """Plaintext bytes (to the peer, from the peer) so far, live connections included, so
        a long-lived connection shows in the byte counters before it ends."""
        live = self._traffic.values()
        return (
            self.stats.bytes_to_peer + sum(t.to_peer for t in live),
            self.stats.bytes_from_peer + sum(t.from_peer for t in live),
        )

    def _handshake_failed(self, exc: HandshakeError, record: ConnectionRecord) -> str:
        self.stats.handshake_failures += 1
        record.failure = failure_class(exc)
        # The key this failed handshake spent (ours or the peer's): every spent key is logged.
        record.spent_key_id = exc.record.qkd_key_id or exc.record.offered_key_id
        side = "peer" if exc.remote else "local"
        return f"handshake failed ({side}): {exc.reason}"[:300]

    def _finish(
        self,
        record: ConnectionRecord,
        started: float,
        *,
        opened: bool = True,
        quiet_as: str | None = None,
    ) -> None:
        now = time.monotonic()
        record.duration_s = round(now - started, 6)
        # closed counts what opened counted: a connection refused at accept is neither.
        if opened:
            self.stats.closed += 1
        fields: dict[str, object] = dict(zip(RECORD_FIELDS, _record_values(record), strict=False))
        level: int | None = logging.INFO
        if quiet_as is not None:
            # A flood of refusals must not become a flood of lines: one per interval per
            # reason, carrying how many were not logged since the previous one.
            suppressed = self._refusal_log.admit(quiet_as, now)
            level = None if suppressed is None else logging.WARNING
            fields["suppressed"] = suppressed
        elif record.reason.startswith(PROBLEM_REASONS):  # one C call rules most ends out
            problem = next(p for p in PROBLEM_REASONS if record.reason.startswith(p))
            similar = self._warnings.admit(problem, now)
            if similar is not None:
                level = logging.WARNING
                if similar:
                    fields["similar_since_last_warning"] = similar
        if level is not None:
            # Where a key went must survive a crash: such a line is never held back.
            log_record_event(log, level, "connection", fields, at_once=record.spends_key)
        if self._on_close is not None:
            self._on_close(record)


def _describe_stream(record: ConnectionRecord, tunnel: MuxTunnel) -> None:
    """A client stream's line names its carrying tunnel, that tunnel's peer and key."""
    record.mux_tunnel = tunnel.conn_id
    record.peer = escape(tunnel.tls.peer.describe())
    record.group = tunnel.tls.record.group
    record.flow = tunnel.tls.record.flow.value if tunnel.tls.record.flow else None
    record.api = tunnel.tls.record.api.value if tunnel.tls.record.api else None
    record.qkd_key_id = tunnel.tls.record.qkd_key_id


def admission_limits(config: TunnelConfig) -> AdmissionLimits:
    """The admission limits a tunnel's configuration sets."""
    return AdmissionLimits(
        max_connections=config.max_connections,
        max_connections_per_source=config.max_connections_per_source,
        max_handshakes=config.max_handshakes,
        max_handshakes_per_source=config.max_handshakes_per_source,
        handshake_rate_per_source=config.handshake_rate_per_source,
        handshake_burst_per_source=config.handshake_burst_per_source,
    )


def failure_class(exc: HandshakeError) -> str:
    """A bounded label for why a handshake failed: the alert's name, or what happened."""
    if exc.alert is not None:
        try:
            return Alert(exc.alert).name.lower()
        except ValueError:
            return "other_alert"
    if exc.outcome is Outcome.TIMEOUT:
        return "timeout"
    if exc.outcome is Outcome.PEER_CLOSED:
        return "peer_closed"
    return "other"


def fallback_reason(exc: HandshakeError) -> str:
    """Why a qkd-preferred handshake fell back, from a small fixed set."""
    text = exc.reason.lower()
    if "insufficient" in text or "exhausted" in text:
        return "kme_exhausted"
    if "key source configured" in text:
        return "no_key_source"
    return "kme_unavailable"


async def _open(
    address: Address, loop: asyncio.AbstractEventLoop
) -> tuple[SocketReader, asyncio.StreamWriter]:
    # Read in place by the pumps from the start (no stream reader built to be replaced).
    if isinstance(address, UnixAddress):
        return await socket_reader.open_unix_connection(address.path, READ_SIZE)
    if isinstance(address, SystemdAddress):
        raise OSError("systemd: addresses can only listen")
    reader, writer = await socket_reader.open_connection(
        address.host, address.port, READ_SIZE, loop
    )
    gate.keep_dialled_alive(writer)
    return reader, writer


def _trust(config: TunnelConfig, endpoint: TlsEndpoint) -> tuple[object, ...]:
    """What a tunnel's handshakes authenticate the peer against, besides the allow-list:
    the CA bundle's certificates and the certificate policy and, for a client, the address
    and name of the peer it dials (a server's `connect` is its backend)."""
    peer = endpoint.settings.peer
    dialled = (config.connect, config.server_name) if config.role == "client" else None
    return (dialled, config.cert_policy, tuple(peer.trust_anchors))


def _refused(exc: HandshakeError, source: FlushableSource) -> bool:
    """The peer refused, by the alert it sent, a key this handshake took from ``source``.

    The alert is unauthenticated: without a key of ours on the wire (a hello that never
    got that far, or a flow in which the peer originates the key) it proves nothing, and a
    flush on its word alone would let anyone drain the KME.
    """
    offered_ours = exc.record.offered_key_id is not None
    return offered_ours and exc.remote and failure_class(exc) in source.refusal_alerts


async def _close_after_pump(
    reason: str | None,
    traffic: Traffic,
    channel: Channel,
    *,
    tls: asyncio.StreamWriter,
    plaintext: asyncio.StreamWriter,
    unsent: int = 0,
) -> None:
    """Close both sides once the pump ended (the plaintext side is closed by the caller).

    If it broke (one side failed mid-stream: a reset, a TLS error, the peer gone), a side
    that already passed bytes on is reset instead: a close_notify would reach the peer as
    the end of our data, and a FIN would tell the application that a truncated stream was
    complete. The plaintext side is reset too once it sent anything (its upload may have
    been cut, and an empty answer with FIN would pass for success), unless the peer only
    refused our certificate. A side that got nothing is closed as after a failed handshake.
    An end that leaves ``unsent`` bytes of the plaintext side behind (an idle timeout while
    the peer did not read) is broken too: the peer would take what it got for the whole.
    So is a deliberate end (the idle timeout) while a direction that moved bytes had not
    been ended by its sender: both sides are reset, as the receiver of the part must not
    take it for the whole, whichever side it is.
    """
    # None: the pump itself was cut (max lifetime, drain deadline, an exception).
    broken = reason is None or reason.startswith("error") or unsent > 0
    # A deliberate end (an idle timeout) that would leave a direction cut: both reset.
    cut = not broken and _left_open(reason, traffic, traffic.sent_end, traffic.got_end)
    stream = getattr(channel, "stream", None)
    try:
        if cut or (broken and (traffic.to_peer or unsent)):
            # No close_notify; the stream notes what of our bytes the reset dropped.
            if isinstance(stream, TlsStream):
                stream.reset(f"reset after the pump ended ({reason or 'cut'})")
            else:
                gate.reset(tls)
        else:
            await channel.close()
    finally:  # cut again while closing: the plaintext side still gets no FIN for a cut
        if isinstance(stream, TlsStream):
            traffic.delivered = stream.delivered  # a close cut short drops bytes too
        refused = (
            isinstance(stream, TlsStream)
            and stream.failure is not None
            and (stream.failure.identity_refused)
        )
        if cut or (broken and (traffic.from_peer or ((traffic.to_peer or unsent) and not refused))):
            _reset_plaintext(plaintext, traffic)


def _reset_plaintext(plaintext: asyncio.StreamWriter, traffic: Traffic) -> None:
    """Reset the plaintext side; what the reset dropped was never passed on."""
    traffic.dropped = min(traffic.from_peer, gate.reset(plaintext))


def _left_open(reason: str | None, traffic: Traffic, sent_end: bool, got_end: bool) -> bool:
    """An end other than both sides finishing while a direction had moved bytes and its
    sender had not ended it (``sent_end``: the plaintext side's; ``got_end``: the peer's)."""
    if reason == "closed":
        return False
    return bool((traffic.to_peer and not sent_end) or (traffic.from_peer and not got_end))


def _unsent(reader: asyncio.StreamReader | SocketReader) -> int:
    """What the plaintext side sent that the pump did not pass on (a client's listener
    reads with a socket reader, which the pump reads in place)."""
    return reader.buffered if isinstance(reader, SocketReader) else 0


def _unreachable(exc: OSError | TimeoutError) -> str:
    return f"backend unreachable: {getattr(exc, 'strerror', None) or type(exc).__name__}"


async def _close_stream(
    reason: str | None,
    traffic: Traffic,
    mux: MuxStream,
    plaintext: asyncio.StreamWriter,
    unsent: int,
) -> None:
    """:func:`_close_after_pump` for a stream: a broken one is reset (RST_STREAM), and so is
    its plaintext side once it passed anything, or handed over bytes (``unsent``) that
    never left (a stream counts bytes as they leave, and an upload that waited for a
    window or a backed-up tunnel must not end in a FIN that passes for delivered); the
    tunnel itself carries on. An end that left bytes unsent (an idle timeout while a window
    stayed shut) is a cut, never an END_STREAM: the peer would take what it got for the
    whole. So is a deliberate end (the idle timeout) while a direction that moved bytes
    had not been ended by its sender. A refusal stays a close: the peer processed nothing."""
    refusal = (reason or "").startswith("rejected")
    cut = not refusal and (
        unsent > 0 or _left_open(reason, traffic, mux.finished, mux.peer_finished)
    )
    if reason is None or reason.startswith("error") or cut:
        try:
            await mux.reset()
        finally:  # cut again while resetting: the plaintext side still gets no FIN
            if traffic.to_peer or traffic.from_peer or unsent:
                _reset_plaintext(plaintext, traffic)
    else:
        await mux.close()
