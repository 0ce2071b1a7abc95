"""The asyncio side of one multiplexed tunnel: a :class:`MuxConnection` over a TLS stream.

One reader task feeds the peer's bytes to the protocol and passes each stream's bytes on
to its plaintext side from there; every call that makes the protocol produce bytes hands
them to the TLS stream before it yields, so frames keep their order. :func:`pump_stream`
moves one stream, both ways on the event loop's callbacks (no task per stream):
backpressure comes from the HTTP/2 windows (a stream's received bytes are acknowledged
only once its plaintext side took them; its plaintext side is read only while it has
window) and from the tunnel's transport buffer (streams stop reading while it drains).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine

from qkdproxy.core.mux import (
    FRAME_SIZE,
    STREAM_WINDOW,
    MuxConnection,
    MuxError,
    MuxEvent,
    PeerSettled,
    PingAnswered,
    ResetCode,
    StreamAccepted,
    StreamBroken,
    StreamData,
    StreamFinished,
    StreamOpened,
    StreamRefused,
    StreamUnprocessed,
    TunnelEnded,
    WindowOpened,
)
from qkdproxy.daemon import gate
from qkdproxy.daemon.pump import FreshKeyBudget, RekeyBudget, Traffic, refresh_keys
from qkdproxy.io.socket_reader import SocketReader
from qkdproxy.io.tls_stream import TlsStream, TlsStreamError, close_transport

log = logging.getLogger("qkdproxy.mux")
# Everything already opened, in one protocol call: fewer event-loop rounds per byte.
READ_BATCH = 1 << 20
# What the tunnel's reader may hand to a backed-up transport without waiting for it
# (WINDOW_UPDATEs, acknowledgements): past this the peer is making us answer while it
# does not read, and the reader waits for the drain like any sender.
ANSWER_LIMIT = 1 << 20
# A stream's plaintext side may buffer this much before its window stops being returned
# (asyncio's default high-water mark, what StreamWriter.drain waits for).
SINK_HIGH_WATER = 64 * 1024
# Client: what a stream keeps of the application's bytes until the server accepts it, so
# that a stream it did not process can be sent again. Our server returns no window before
# its 200, so at most a stream window is sent by then, plus the one read that waits for
# window; a peer that opens the window early gets no retry past this.
REPLAY_LIMIT = STREAM_WINDOW + FRAME_SIZE


class MuxStreamError(Exception):
    """A stream ended badly: reset by the peer, refused, or its tunnel broke."""


class TunnelFullError(MuxStreamError):
    """No stream was opened: the tunnel is at the peer's stream limit (or does not know it
    yet). Nothing was sent; another tunnel may take the connection."""


class MuxStream:
    """One application connection inside a tunnel.

    Both directions run on callbacks, not tasks of their own. Inbound: once
    :func:`pump_stream` attached the plaintext side, each DATA frame is written there as it
    is dispatched and acknowledged at once unless the plaintext side is backed up (then the
    acknowledgement waits for its drain, so the peer stops at the stream window).
    Outbound: the plaintext socket's reader calls :meth:`_pull` as bytes arrive, which
    frames what the windows allow and hands it to TLS at once; a shut window or a backed-up
    tunnel leaves the rest in the reader (which stops reading the socket when full) until
    a WINDOW_UPDATE or the tunnel's drain calls it again.
    """

    def __init__(self, tunnel: MuxTunnel, stream_id: int) -> None:
        self.tunnel = tunnel
        self.stream_id = stream_id
        # What arrived before the pump attached the plaintext side (bounded by the window).
        self._inbound: deque[tuple[bytes, int]] = deque()
        self._window = asyncio.Event()
        # Client: the status a refusing server gave (403, 502...), once it did.
        self.refused: int | None = None
        # Client: why the server did not process the stream (REFUSED_STREAM, GOAWAY).
        self.unprocessed: str | None = None
        # Client: the application's bytes (and whether its end followed) until the server
        # accepts the stream; None once accepted, on a server, or past REPLAY_LIMIT.
        self._kept: bytearray | None = None
        self._kept_fin = False
        # Client: what a stream the peer did not process carried, sent first by this one.
        self._preload: tuple[bytes, bool] | None = None
        self.peer_finished = False
        self.finished = False
        self.error: str | None = None
        self.done = False
        # Client: our request is still queued (see MuxTunnel.open_stream).
        self.request_queued = False
        # Set by pump_stream: the plaintext side, its counters and the pump's outcome.
        self._sink: asyncio.StreamWriter | None = None
        self._source: SocketReader | None = None
        self._traffic = Traffic()
        self._outcome: asyncio.Future[str] | None = None
        self._sent_all = False
        # Acknowledgements held back while the plaintext side drains, and who waits.
        self._held = 0
        self._draining: asyncio.Task[None] | None = None
        # Counted in the tunnel's ``active`` until it ended both ways or was released, and
        # in its ``senders`` until our side ended (or failed).
        self._active = True
        self._sending = True

    # The tunnel's reader calls these.

    def _deliver(self, data: bytes, flow: int) -> None:
        self.tunnel.bytes_moved += len(data)
        if self.refused is not None:
            # A refusal's body (a peer that did not end the stream with its 403 or 502):
            # not tunnel data, never the application's. Dropped, and credited back.
            self._held += flow
            return
        if self._sink is None:
            self._inbound.append((data, flow))
        else:
            self._pass_on(data, flow)

    def _peer_end(self) -> None:
        self.peer_finished = True
        self._settle()
        if self._sink is not None:
            self._write_eof()

    def _settle(self) -> None:
        """Leave the tunnel's ``senders`` once our side ended (or failed, or was released),
        its ``active`` count once ended both ways (or released)."""
        if self._sending and (self.finished or self.done or self.error is not None):
            self._sending = False
            self.tunnel.senders -= 1
        if self._active and (self.done or (self.finished and self.peer_finished)):
            self._active = False
            self.tunnel.active -= 1

    def _fail(self, why: str) -> None:
        if self.error is None and not (self.finished and self.peer_finished):
            self.error = why
        self._settle()
        self._window.set()
        if self.error is not None:
            self._conclude(f"error: MuxStreamError: {self.error}"[:200])

    # The inbound direction, once attached.

    def _pass_on(self, data: bytes, flow: int) -> None:
        sink = self._sink
        assert sink is not None
        if sink.is_closing():
            self._conclude("error: ConnectionResetError: Connection lost")
            self._held += flow  # dropped: returned to the tunnel when the stream is released
            return
        self._traffic.from_peer += len(data)
        self._traffic.last_activity = time.monotonic()
        sink.write(data)
        if self._held or sink.transport.get_write_buffer_size() > SINK_HIGH_WATER:
            # Backed up: the peer gets no more window until the plaintext side drained.
            self._held += flow
            if self._draining is None:
                self._draining = asyncio.ensure_future(self._drain())
        elif self.tunnel.conn.consumed(self.stream_id, flow):
            self.tunnel.flush_soon()

    async def _drain(self) -> None:
        assert self._sink is not None
        try:
            while self._held:
                await self._sink.drain()
                flow, self._held = self._held, 0
                if self.tunnel.conn.consumed(self.stream_id, flow):
                    await self.tunnel.flush()
        except (ConnectionError, TlsStreamError) as exc:
            self._conclude(f"error: {type(exc).__name__}: {exc}"[:200])
        finally:
            self._draining = None

    def _write_eof(self) -> None:
        assert self._sink is not None
        if self._sink.can_write_eof():
            with contextlib.suppress(OSError, RuntimeError):
                self._sink.write_eof()
        if self._sent_all:
            self._conclude("closed")

    def _conclude(self, reason: str) -> None:
        if self._outcome is not None and not self._outcome.done():
            self._outcome.set_result(reason)

    # The outbound direction.

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        """Send application bytes, waiting for window as the peer consumes."""
        view: bytes | bytearray | memoryview = data
        while view:
            self._check()
            # Cleared before the window is looked at, not after the flush: a WINDOW_UPDATE
            # read while the flush waits for the transport must not be lost (the peer sends
            # no second one, and the tunnel window's updates wake only streams it stopped).
            self._window.clear()
            try:
                sent = self.tunnel.conn.send(self.stream_id, view)
            except MuxError as exc:
                raise MuxStreamError(str(exc)) from None
            view = memoryview(view)[sent:] if sent < len(view) else b""
            self.tunnel.bytes_moved += sent
            if sent or self.request_queued:
                await self._flush()
            if view:
                await self._window.wait()

    async def send_fin(self) -> None:
        """End our direction (END_STREAM)."""
        self._check()
        try:
            self.tunnel.conn.finish(self.stream_id)
        except MuxError as exc:
            raise MuxStreamError(str(exc)) from None
        self.finished = True
        self._settle()
        await self._flush()

    def preload(self, data: bytes, fin: bool) -> None:
        """Client: send what a stream the peer did not process carried (and its end, if
        the application had ended) before reading the application again. Kept at once:
        a stream disowned before its preload was sent gives it back all the same."""
        self._preload = (data, fin)
        self._keep(data)
        self._kept_fin = fin

    def kept(self) -> tuple[bytes, bool] | None:
        """Client: the application's bytes and whether it ended, if the peer did not
        process the stream and they were all kept: what another stream may send again."""
        if self.unprocessed is None or self._kept is None:
            return None
        return bytes(self._kept), self._kept_fin

    async def _send_preload(self, source: SocketReader) -> bool:
        """Send what :meth:`preload` gave (in a task of its own: nothing holds it once sent
        for the rest of a long-lived connection), then read ``source``; whether it ended
        the stream."""
        assert self._preload is not None
        replay, fin = self._preload
        self._preload = None
        await self.send(replay)
        if fin:
            await self.send_fin()
        else:
            self._read_from(source)
        return fin

    def _read_from(self, source: SocketReader) -> None:
        """Read the plaintext side on callbacks from now on."""
        self._source = source
        source.listen(self._pull)
        self._pull()

    def _keep(self, data: bytes | memoryview) -> None:
        if self._kept is not None:
            if len(self._kept) + len(data) > REPLAY_LIMIT:
                self._kept = None  # a peer that opened the window before accepting
            else:
                self._kept += data

    def _pull(self) -> None:
        """Send what the plaintext side has ready, as far as the windows and the tunnel's
        buffer allow: its reader's callback, and again when a window opened or the tunnel
        drained. Its end sends END_STREAM."""
        source = self._source
        if source is None or self.error is not None or self.finished:
            return
        tunnel = self.tunnel
        traffic = self._traffic
        moved = False
        try:
            while not tunnel.backed_up:
                data = source.ready()
                if data is None:
                    break
                if not data:
                    self._kept_fin = True
                    self._finish_now()
                    self._sent_everything()
                    return
                # The reader's buffer is read in place: send copies what it takes into the
                # tunnel's output, and only then is it consumed.
                sent = tunnel.conn.send(self.stream_id, data)
                if not sent:
                    break  # window shut: its WINDOW_UPDATE calls again
                # Kept for a peer that does not process the stream, which another may resend.
                self._keep(data[:sent] if sent < len(data) else data)
                source.consume(sent)
                tunnel.bytes_moved += sent
                traffic.to_peer += sent
                traffic.last_activity = time.monotonic()
                moved = True
            if moved:
                # A queued request or 200 leaves with these bytes, not before them alone.
                self.request_queued = False
                tunnel.send_now()
        except MuxError as exc:
            self._conclude(f"error: MuxStreamError: {exc}"[:200])
        except Exception as exc:  # what broke the plaintext side or the tunnel: this stream's end
            self._conclude(f"error: {type(exc).__name__}: {exc}"[:200])

    def _resume(self) -> None:
        """A window opened or the tunnel drained: send what waits (if reading on callbacks)."""
        if self._source is not None:
            self._pull()

    def _finish_now(self) -> None:
        """END_STREAM, handed to TLS without waiting (TlsStreamError, MuxError)."""
        self.tunnel.conn.finish(self.stream_id)
        self.finished = True
        self._settle()
        self.request_queued = False
        self.tunnel.send_now()

    def _send_request(self) -> None:
        """Client: send the request if no bytes of the application took it along."""
        if self.request_queued and self._outcome is not None and not self._outcome.done():
            self.request_queued = False
            try:
                self.tunnel.send_now()
            except TlsStreamError as exc:
                self._conclude(f"error: {type(exc).__name__}: {exc}"[:200])

    def _sent_everything(self) -> None:
        if self.peer_finished:
            self._conclude("closed")
        else:
            self._sent_all = True

    def _preload_done(self, task: asyncio.Task[bool]) -> None:
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            self._conclude(f"error: {type(error).__name__}: {error}"[:200])
        elif task.result():
            self._sent_everything()

    # Ends.

    async def close(self) -> None:
        """A deliberate end: END_STREAM if not yet sent; a peer direction still open is
        cancelled (nothing will read it)."""
        try:
            with contextlib.suppress(MuxStreamError, TlsStreamError):
                if self.error is None and not self.finished:
                    await self.send_fin()
                if self.error is None and not self.peer_finished:
                    await self.reset(ResetCode.CANCEL)
        finally:  # cancelled while flushing: the stream still leaves its tunnel
            self._release()

    async def reset(self, code: ResetCode = ResetCode.CANCEL) -> None:
        """Reset the stream (RST_STREAM): the peer must not take its end for a clean one."""
        try:
            if self.tunnel.alive:
                self.tunnel.conn.reset(self.stream_id, code)
                with contextlib.suppress(TlsStreamError):
                    await self.tunnel.flush()
        finally:  # cancelled while flushing: the stream still leaves its tunnel
            self.error = self.error or "reset by us"
            self._release()

    async def _flush(self) -> None:
        self.request_queued = False
        await self.tunnel.flush()

    def _release(self) -> None:
        if not self.done:
            self.done = True
            # Bytes never passed on (buffered before the pump attached, held for a backed-up
            # or closed plaintext side) go back to the tunnel's window: from here on nothing
            # will acknowledge them, and a tunnel window's worth of refused or reset streams
            # would otherwise leave the tunnel shut for every stream.
            flow, self._held = self._held + sum(size for _, size in self._inbound), 0
            self._inbound.clear()
            if self.tunnel.conn.consumed(self.stream_id, flow):
                self.tunnel.flush_soon()
            self._settle()
            self.tunnel.stream_done(self)

    def _check(self) -> None:
        if self.error is not None:
            raise MuxStreamError(self.error)


async def pump_stream(
    reader: asyncio.StreamReader | SocketReader,
    writer: asyncio.StreamWriter,
    stream: MuxStream,
    traffic: Traffic,
    *,
    idle_timeout_s: float,
) -> str:
    """:func:`pump` for a stream: both directions until both ended (or one failed, or
    ``idle_timeout_s`` passed without bytes either way); why it ended. Both directions run
    on callbacks; one timer per stream (a task only to resend what a stream the peer did
    not process carried)."""
    loop = asyncio.get_running_loop()
    outcome: asyncio.Future[str] = loop.create_future()
    stream._outcome = outcome
    stream._traffic = traffic
    stream._sink = writer
    while stream._inbound:  # what arrived while the server dialled its backend
        stream._pass_on(*stream._inbound.popleft())
    if stream.error is not None:
        stream._fail(stream.error)
    elif stream.peer_finished:
        stream._write_eof()
    # The plaintext socket is read in place, as the per-connection pump does. At most one
    # DATA frame per receive (the per-connection pump reads twice as much: here that
    # measured more instructions per byte, the output buffer growing).
    source = SocketReader.attach(reader, writer, FRAME_SIZE)
    preload: asyncio.Task[bool] | None = None
    if stream._preload is not None:
        preload = asyncio.ensure_future(stream._send_preload(source))
        preload.add_done_callback(stream._preload_done)
    else:
        stream._read_from(source)
    timer: asyncio.TimerHandle | None = None

    def idle_check() -> None:
        nonlocal timer
        left = traffic.last_activity + idle_timeout_s - time.monotonic()
        if left <= 0:
            stream._conclude("idle_timeout")
        else:
            timer = loop.call_later(left, idle_check)

    if idle_timeout_s:
        timer = loop.call_later(idle_timeout_s, idle_check)
    if stream.request_queued:
        # Client: the application's first bytes may come in the next round of the loop;
        # the queued request leaves with them, or alone after that round (a silent,
        # server-speaks-first application).
        loop.call_soon(stream._send_request)
    try:
        return await outcome
    finally:
        if timer is not None:
            timer.cancel()
        source.listen(None)
        stream._source = None
        for task in (preload, stream._draining):
            if task is not None and not task.done():
                task.cancel()
        if preload is not None and not preload.done():
            await asyncio.gather(preload, return_exceptions=True)
        stream._sink = None


class MuxTunnel:
    """A ``qkdproxy-mux/1`` tunnel: streams, keepalive, rekeying, orderly or broken end."""

    def __init__(
        self,
        stream: TlsStream,
        writer: asyncio.StreamWriter,
        conn: MuxConnection,
        *,
        keepalive_s: float,
        rekey: RekeyBudget,
        fresh: FreshKeyBudget | None = None,
        on_stream: Callable[[MuxStream], None] | None = None,
        on_change: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tls = stream
        self._writer = writer
        self.conn = conn
        self.keepalive_s = keepalive_s
        self._rekey = rekey
        self._fresh = fresh
        self._traffic = Traffic()
        self._on_stream = on_stream
        # Told whenever capacity may have changed (a stream ended, the tunnel ended).
        self.on_change = on_change
        self._clock = clock
        self.streams: dict[int, MuxStream] = {}
        # Streams not yet ended both ways: their handlers may hold (or dial) a backend,
        # and they may send more.
        self.active = 0
        # Streams whose side has not ended yet: the ones that may write DATA. Writes are
        # coalesced per round of the event loop only with two or more (a stream that
        # only waits for its peer's end, as the last connection's often does when the
        # next one starts, has nothing to coalesce).
        self.senders = 0
        # The carrying connection's id in the log (the streams' mux_tunnel).
        self.conn_id = 0
        self.started = clock()
        self.last_received = self.started
        self.last_busy = self.started
        self.bytes_moved = 0
        self.streams_carried = 0
        # Server: the allow-list the peer was last checked against, and its verdict (both
        # immutable; a reload brings a new list, checked afresh).
        self.allow_verdict: tuple[object, bool] | None = None
        # Why the tunnel ended (None while it runs); broken: its streams were reset.
        self.reason: str | None = None
        self.broken = False
        self.draining = False
        # Client: streams the peer left unprocessed (REFUSED_STREAM, above its GOAWAY's
        # last id). A tunnel that disowned every stream it carried did no work for its key.
        self.disowned = 0
        self.ended = asyncio.Event()
        # Set once the peer's SETTINGS arrived (its stream limit is known).
        self.settled = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._want_write = asyncio.Event()
        # The transport's buffer is past its high-water mark (or keys are due): streams
        # read no more of their plaintext sides until the writer task has drained it.
        self.backed_up = False
        # A write of what the streams queue in this round of the event loop is scheduled.
        self._loop: asyncio.AbstractEventLoop | None = None  # the first write's
        self._write_scheduled = False
        # What the reader handed to the transport while it was backed up (ANSWER_LIMIT).
        self._answered = 0

    @property
    def disowned_all(self) -> bool:
        """Client: the peer left every stream of the tunnel unprocessed (at least one)."""
        return 0 < self.streams_carried <= self.disowned

    @property
    def key_updates(self) -> int:
        """KeyUpdates sent on the tunnel's TLS stream."""
        return self._traffic.key_updates

    @property
    def alive(self) -> bool:
        """Still carrying (or able to carry) streams."""
        return self.reason is None

    def start(self) -> None:
        """Send the preface and start reading (and keepalives)."""
        self.conn.start()
        self._spawn(self._read())
        self._spawn(self._write_queued())
        if self.keepalive_s:
            self._spawn(self._keepalive())
        # Extended Key Update on the tunnel's budget (time; bytes count what this side sends).
        if self._fresh is not None and self.tls.fresh_key_updates:  # budget and deadline
            self._spawn(refresh_keys(self.tls, self._traffic, self._fresh))

    def _spawn(self, coro: Coroutine[object, object, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def flush(self) -> None:
        """Hand the protocol's queued bytes to TLS (TlsStreamError if the tunnel broke).

        With more than one stream sending, the write waits for the end of this round of the
        event loop, once the streams ready in it have queued their frames: all of them
        leave in one TLS record and one socket write. A sender still waits while the
        transport is backed up. One sender alone writes at once (nothing to coalesce with,
        and a round of the loop saved)."""
        if not self.conn.pending:
            return
        if self.reason is not None and self.broken:
            raise TlsStreamError(self.reason)
        if self.senders < 2 and not self.backed_up:
            await self._write_now()
            return
        self._write_soon()
        try:
            await self._writer.drain()
        except ConnectionError as exc:
            self._break(f"tunnel broke: {type(exc).__name__}: {exc}")
            raise TlsStreamError(self.reason or "tunnel broke") from None

    def flush_soon(self) -> None:
        """Flush from a callback (a stream's WINDOW_UPDATE), at the end of this round."""
        self._write_soon()

    def send_now(self) -> None:
        """:meth:`flush` from a callback: one stream alone hands its frames to TLS now,
        without waiting; with several sending they leave together at the end of this round
        of the event loop. :class:`TlsStreamError` if the tunnel broke."""
        if not self.conn.pending:
            return
        if self.senders < 2 and not self.backed_up:
            self._write_checked()
        else:
            self._write_soon()

    def _write_soon(self) -> None:
        # A callback, not the writer task: no task step per write (a stream's callbacks
        # run in the loop's I/O phase, before it).
        if not self._write_scheduled:
            self._write_scheduled = True
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            self._loop.call_soon(self._write_round)

    def _write_round(self) -> None:
        self._write_scheduled = False
        if self.backed_up:
            return  # the writer task writes once the transport drained
        with contextlib.suppress(TlsStreamError):  # broken: its streams were failed
            self._write_checked()

    def _write_checked(self) -> None:
        """Write what is queued; past the transport's high-water mark (or with keys due)
        streams stop reading until the writer task drained it (and renewed them)."""
        if self._write_sync():
            self.backed_up = True
            self._want_write.set()

    def _answer(self) -> None:
        """The reader's write: what a read produced (WINDOW_UPDATEs, acknowledgements, the
        frames of streams it woke) goes to TLS without waiting for the transport. A reader
        that waits for its own writes stops reading the peer; if the peer's reader waits
        for its writes too, neither transport ever drains (both tunnels hang). Answers into
        a backed-up transport are written at once and counted against ANSWER_LIMIT;
        otherwise they leave like any stream's frames (:meth:`send_now`: with those of
        every stream sending in this round of the event loop)."""
        if not self.backed_up:
            self.send_now()
            return
        self._answered += self.conn.pending_size
        self._write_checked()

    def _write_sync(self) -> bool:
        """Hand the queued frames to TLS; whether the writer task must run before more is
        sent (the transport's buffer is past its high-water mark, or keys are due)."""
        data = self.conn.data_to_send()
        if not data:
            return False
        if self.reason is not None and self.broken:
            raise TlsStreamError(self.reason)
        try:
            backed_up = self.tls.write_nowait(data)
        except TlsStreamError as exc:
            self._break(f"tunnel broke: {exc}")
            raise
        self._traffic.bytes_since_rekey += len(data)
        self._traffic.to_peer += len(data)
        return backed_up or self._traffic.rekey_due(self._rekey, self._clock())

    async def _write_now(self) -> None:
        if not self.conn.pending and not self.backed_up:
            return
        self._write_sync()
        try:
            await self.tls.drain()
        except TlsStreamError as exc:
            self._break(f"tunnel broke: {exc}")
            raise
        now = self._clock()
        if self._traffic.rekey_due(self._rekey, now):
            self._traffic.bytes_since_rekey, self._traffic.last_rekey = 0, now
            self._traffic.key_updates += 1
            await self.tls.update_keys()

    async def _write_queued(self) -> None:
        """The writer task: waits for a backed-up transport to drain (and renews the keys
        when due); then the streams read their plaintext sides again."""
        while True:
            await self._want_write.wait()
            self._want_write.clear()
            try:
                await self._write_now()
            except TlsStreamError:
                return  # the tunnel broke: its streams were failed
            self._answered = 0
            if self.backed_up:
                self.backed_up = False
                for stream in list(self.streams.values()):
                    stream._resume()
                self._write_soon()  # what was queued meanwhile (a WINDOW_UPDATE)

    # ---------------------------------------------------------------- streams

    def open_stream(self) -> MuxStream:
        """Client: a new stream. Its data may follow the request at once (the server buffers
        it within the stream window until its backend is connected); a refusal arrives as
        the stream's error, with :attr:`MuxStream.refused` set.

        The request stays queued until the stream's first send, end or reset, or the
        pump's first round (whichever comes first; the next flush of any stream carries
        it too): a pump that has the application's first bytes at hand then sends
        request and data in one record, not two."""
        if not self.alive or self.draining:
            raise MuxStreamError("tunnel not accepting streams")
        try:
            stream_id = self.conn.open_stream()
        except MuxError as exc:
            raise TunnelFullError(str(exc)) from None
        stream = self._add(stream_id)
        stream.request_queued = True
        stream._kept = bytearray()
        return stream

    def _add(self, stream_id: int) -> MuxStream:
        stream = self.streams[stream_id] = MuxStream(self, stream_id)
        self.active += 1
        self.senders += 1
        self.streams_carried += 1
        self._idle.clear()
        return stream

    def stream_done(self, stream: MuxStream) -> None:
        """A stream ended (its pump is over)."""
        self.streams.pop(stream.stream_id, None)
        if not self.streams:
            self.last_busy = self._clock()
            self._idle.set()
        self.on_change()

    def accept(self, stream: MuxStream) -> None:
        """Server: the stream may carry data. Its 200 is queued, not sent: it leaves with
        the stream's first answer bytes, end or reset (or any other flush), one record
        instead of two; the client sends without waiting for it."""
        self.conn.accept(stream.stream_id)

    async def refuse(self, stream: MuxStream, status: int) -> None:
        """Server: refuse a stream before it carried anything (and stop its upload)."""
        self.conn.refuse(stream.stream_id, status)
        self.conn.reset(stream.stream_id, ResetCode.NO_ERROR)
        stream._release()
        with contextlib.suppress(TlsStreamError):
            await self.flush()

    # ----------------------------------------------------------------- reading

    async def _read(self) -> None:
        try:
            # Our preface and SETTINGS at once: a client opens no stream before it has the
            # server's (its stream limit), so neither side may wait for the other to speak.
            await self.flush()
            while True:
                data = await self.tls.read(READ_BATCH)
                if not data:
                    # close_notify: an orderly end only if no stream was still open.
                    cut = bool(self.streams)
                    self._end("peer closed with streams open" if cut else "closed", broken=cut)
                    return
                self.last_received = self._clock()
                for event in self.conn.receive(data):
                    self._dispatch(event)
                if self._answered > ANSWER_LIMIT:
                    await self.flush()
                else:
                    self._answer()
                if self.conn.ended is not None and self.conn.ended.error:
                    self._break(self.conn.ended.reason)
                    return
        except TlsStreamError as exc:
            self._break(f"tunnel broke: {exc}")
        except MuxError as exc:
            self._break(f"tunnel broke: {exc}")

    def _dispatch(self, event: MuxEvent) -> None:
        if isinstance(event, StreamOpened):
            stream = self._add(event.stream_id)
            # The protocol frees a stream's slot as soon as the peer resets it, but its
            # handler may still be dialling the backend: cap the handlers, not the open
            # streams, or open-then-reset ("Rapid Reset") would bypass mux_max_streams.
            # A handler whose stream ended cleanly both ways is past its dial (our END_STREAM
            # follows the backend's end) and only winding up: the peer, which saw the
            # stream close, may already use its slot, so such handlers do not count.
            if self._on_stream is None or self.draining or self.active > self.conn.max_streams:
                stream._fail("refused")
                self.conn.reset(event.stream_id, ResetCode.REFUSED_STREAM)
                stream._release()
            else:
                self._on_stream(stream)
            return
        if isinstance(event, PeerSettled):
            self.settled.set()
            self.on_change()
            return
        if isinstance(event, PingAnswered):
            return
        if isinstance(event, TunnelEnded):
            self.draining = True  # GOAWAY: open streams may finish, no new ones
            return
        if isinstance(event, WindowOpened) and event.stream_id == 0:
            for stream in list(self.streams.values()):
                stream._window.set()
                stream._resume()
            return
        target = self.streams.get(event.stream_id)
        if target is None:
            if isinstance(event, StreamData):
                # A stream we gave up on: its bytes must not shrink the tunnel's window.
                self.conn.consumed(event.stream_id, event.flow)
            return
        if isinstance(event, StreamData):
            if event.data:
                target._deliver(event.data, event.flow)
            else:
                # An empty DATA frame (padding only) is no end: b"" means FIN to the pump.
                self.conn.consumed(event.stream_id, event.flow)
        elif isinstance(event, StreamFinished):
            target._peer_end()
        elif isinstance(event, StreamAccepted):
            target._kept = None  # processed from here on: never sent again
        elif isinstance(event, StreamRefused):
            target.refused = event.status
            target._fail(f"refused by the peer (status {event.status})")
        elif isinstance(event, StreamUnprocessed):
            self.disowned += 1
            if target.error is None and not (target._outcome and target._outcome.done()):
                # Only if nothing else ended it first (the application's reset, say):
                # then there is nothing left to send again.
                target.unprocessed = event.cause
            target._fail(f"not processed by the peer ({event.cause})")
        elif isinstance(event, StreamBroken):
            target._fail(f"reset by the peer (code {event.code})")
        elif isinstance(event, WindowOpened):
            target._window.set()
            target._resume()

    # --------------------------------------------------------------- keepalive

    async def _keepalive(self) -> None:
        # A third of the budget of silence earns a PING, the whole budget ends the tunnel:
        # a dead peer (or a black-holed path) is found in at most keepalive_s plus a tick.
        tick = self.keepalive_s / 3
        while self.alive:
            await asyncio.sleep(tick)
            silent = self._clock() - self.last_received
            if silent >= self.keepalive_s:
                self._break(f"dead peer: nothing received for {silent:.1f}s")
                return
            if silent >= tick:
                self.conn.ping()
                # Never waits for the transport: over a black-holed path it never drains,
                # and the silence must still be looked at on the next tick.
                self.flush_soon()

    # -------------------------------------------------------------------- ends

    def _end(self, reason: str, *, broken: bool) -> None:
        if self.reason is not None:
            return
        self.reason, self.broken = reason, broken
        for stream in list(self.streams.values()):
            stream._fail(reason)
        self.ended.set()
        self.on_change()

    def _break(self, reason: str) -> None:
        """The tunnel broke: reset the transport (no close_notify) and fail every stream."""
        if self.reason is None:
            self._end(reason, broken=True)
            self._abandon(reason)

    def _abandon(self, reason: str) -> None:
        """Reset the transport, settle an unfinished update's key (failed), stop the tasks."""
        gate.reset(self._writer)
        self.tls.abort(reason)
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()

    def stop_streams(self) -> None:
        """Take no new streams from now on. A server says so at once (GOAWAY naming the
        last stream it took): the peer sends the streams it opens meanwhile elsewhere."""
        self.draining = True
        if not self.conn.client and self.alive:
            self.conn.goaway()
            self.flush_soon()

    async def drain(self, why: str = "closed") -> None:
        """Take no new streams, wait until the open ones ended, then close cleanly."""
        self.stop_streams()
        await self._idle.wait()
        await self.close(why)

    async def close(self, why: str = "closed") -> None:
        """GOAWAY then close_notify; streams still open are reset, never ended cleanly."""
        if self.reason is not None:
            await self._finish_tasks()
            return
        if self.streams:
            self._break("closed with streams open")
        else:
            self._end(why, broken=False)
            try:
                with contextlib.suppress(TlsStreamError, ConnectionError):
                    self.conn.close()
                    await self._write_now()  # before close_notify, not by the writer task
                await self.tls.close()
            except asyncio.CancelledError:
                # Cut while the peer does not read (the daemon stops now): no waiting for
                # the rest of the close, and nothing left running or open behind it.
                self._abandon("cut while closing")
                raise
        await self._finish_tasks()

    async def _finish_tasks(self) -> None:
        for task in list(self._tasks):
            if task is not asyncio.current_task():
                task.cancel()
        try:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        finally:  # cut while they end: the socket goes all the same
            await close_transport(self._writer)

    async def wait_settled(self) -> bool:
        """Wait until the peer's SETTINGS arrived (True) or the tunnel ended (False)."""
        settled = asyncio.ensure_future(self.settled.wait())
        ended = asyncio.ensure_future(self.ended.wait())
        try:
            await asyncio.wait({settled, ended}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            settled.cancel()
            ended.cancel()
        return self.settled.is_set() and self.alive

    async def wait(self) -> str:
        """Run until the tunnel ended; why it ended."""
        await self.ended.wait()
        await self._finish_tasks()
        assert self.reason is not None
        return self.reason
