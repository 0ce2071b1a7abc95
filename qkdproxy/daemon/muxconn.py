"""The asyncio side of one multiplexed tunnel: a :class:`MuxConnection` over a TLS stream.

One reader task feeds the peer's bytes to the protocol and wakes the streams; every call
that makes the protocol produce bytes hands them to the TLS stream before it yields, so
frames keep their order. Each :class:`MuxStream` is a ``Channel`` for the ordinary pump:
backpressure comes from the HTTP/2 windows (a stream's received bytes are acknowledged
only once the pump passed them on) and from the TLS stream's drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine

from qkdproxy.core.mux import (
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
    TunnelEnded,
    WindowOpened,
)
from qkdproxy.daemon import gate
from qkdproxy.daemon.pump import FreshKeyBudget, RekeyBudget, Traffic, refresh_keys
from qkdproxy.io.tls_stream import TlsStream, TlsStreamError, close_transport

log = logging.getLogger("qkdproxy.mux")
# Everything already opened, in one protocol call: fewer event-loop rounds per byte.
READ_BATCH = 1 << 20


class MuxStreamError(Exception):
    """A stream ended badly: reset by the peer, refused, or its tunnel broke."""


class TunnelFullError(MuxStreamError):
    """No stream was opened: the tunnel is at the peer's stream limit (or does not know it
    yet). Nothing was sent; another tunnel may take the connection."""


class MuxStream:
    """One application connection inside a tunnel (a ``Channel`` for :func:`pump`)."""

    def __init__(self, tunnel: MuxTunnel, stream_id: int) -> None:
        self.tunnel = tunnel
        self.stream_id = stream_id
        self._inbound: deque[tuple[bytes, int]] = deque()
        self._wake = asyncio.Event()
        self._window = asyncio.Event()
        # Client: the status a refusing server gave (403, 502...), once it did.
        self.refused: int | None = None
        self.peer_finished = False
        self.finished = False
        self.error: str | None = None
        self.done = False
        # Client: our request is still queued (see MuxTunnel.open_stream(send=False)).
        self.request_queued = False

    # The tunnel's reader calls these.

    def _deliver(self, data: bytes, flow: int) -> None:
        self._inbound.append((data, flow))
        self.tunnel.bytes_moved += len(data)
        self._wake.set()

    def _fail(self, why: str) -> None:
        if self.error is None and not (self.finished and self.peer_finished):
            self.error = why
        self._wake.set()
        self._window.set()

    # Channel

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        """Send application bytes, waiting for window as the peer consumes."""
        view: bytes | bytearray | memoryview = data
        while view:
            self._check()
            try:
                sent = self.tunnel.conn.send(self.stream_id, view)
            except MuxError as exc:
                raise MuxStreamError(str(exc)) from None
            view = memoryview(view)[sent:] if sent < len(view) else b""
            self.tunnel.bytes_moved += sent
            if sent or self.request_queued:
                await self._flush()
            if view:
                self._window.clear()
                await self._window.wait()

    async def send_fin(self) -> None:
        """End our direction (END_STREAM)."""
        self._check()
        try:
            self.tunnel.conn.finish(self.stream_id)
        except MuxError as exc:
            raise MuxStreamError(str(exc)) from None
        self.finished = True
        await self._flush()

    async def receive(self) -> bytes:
        """The next application bytes; b"" once the peer ended its direction."""
        while not self._inbound:
            if self.error is not None:
                raise MuxStreamError(self.error)
            if self.peer_finished:
                return b""
            if self.request_queued:
                await self._flush()  # nothing to wait for until the peer has our request
            self._wake.clear()
            await self._wake.wait()
        # Everything queued in one piece: one write (and drain) on the plaintext side.
        chunks, flow = [], 0
        while self._inbound:
            data, size = self._inbound.popleft()
            chunks.append(data)
            flow += size
        self.tunnel.conn.consumed(self.stream_id, flow)
        await self._flush()
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def update_keys(self) -> None:
        """Nothing per stream: the tunnel renews its traffic keys on its own budget."""

    async def close(self) -> None:
        """A deliberate end: END_STREAM if not yet sent; a peer direction still open is
        cancelled (nothing will read it)."""
        with contextlib.suppress(MuxStreamError, TlsStreamError):
            if self.error is None and not self.finished:
                await self.send_fin()
            if self.error is None and not self.peer_finished:
                await self.reset(ResetCode.CANCEL)
        self._release()

    async def reset(self, code: ResetCode = ResetCode.CANCEL) -> None:
        """Reset the stream (RST_STREAM): the peer must not take its end for a clean one."""
        if self.tunnel.alive:
            self.tunnel.conn.reset(self.stream_id, code)
            with contextlib.suppress(TlsStreamError):
                await self.tunnel.flush()
        self.error = self.error or "reset by us"
        self._release()

    async def _flush(self) -> None:
        self.request_queued = False
        await self.tunnel.flush()

    def _release(self) -> None:
        if not self.done:
            self.done = True
            self.tunnel.stream_done(self)

    def _check(self) -> None:
        if self.error is not None:
            raise MuxStreamError(self.error)


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
        # The carrying connection's id in the log (the streams' mux_tunnel).
        self.conn_id = 0
        self.started = clock()
        self.last_received = self.started
        self.last_busy = self.started
        self.bytes_moved = 0
        self.streams_carried = 0
        # Why the tunnel ended (None while it runs); broken: its streams were reset.
        self.reason: str | None = None
        self.broken = False
        self.draining = False
        self.ended = asyncio.Event()
        # Set once the peer's SETTINGS arrived (its stream limit is known).
        self.settled = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()

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
        """Hand the protocol's queued bytes to TLS (TlsStreamError if the tunnel broke)."""
        data = self.conn.data_to_send()
        if not data:
            return
        if self.reason is not None and self.broken:
            raise TlsStreamError(self.reason)
        try:
            await self.tls.write(data)
        except TlsStreamError as exc:
            self._break(f"tunnel broke: {exc}")
            raise
        self._traffic.bytes_since_rekey += len(data)
        self._traffic.to_peer += len(data)
        now = self._clock()
        if self._traffic.rekey_due(self._rekey, now):
            self._traffic.bytes_since_rekey, self._traffic.last_rekey = 0, now
            self._traffic.key_updates += 1
            await self.tls.update_keys()

    # ---------------------------------------------------------------- streams

    async def open_stream(self, *, send: bool = True) -> MuxStream:
        """Client: a new stream. Its data may follow the request at once (the server buffers
        it within the stream window until its backend is connected); a refusal arrives as
        the stream's error, with :attr:`MuxStream.refused` set.

        ``send=False`` leaves the request queued until the stream's first send, receive,
        end or reset (whichever comes first; the next flush of any stream carries it too):
        a pump that has the application's first bytes at hand then sends request and data
        in one record, not two."""
        if not self.alive or self.draining:
            raise MuxStreamError("tunnel not accepting streams")
        try:
            stream_id = self.conn.open_stream()
        except MuxError as exc:
            raise TunnelFullError(str(exc)) from None
        stream = self._add(stream_id)
        if not send:
            stream.request_queued = True
            return stream
        try:
            await self.flush()
        except BaseException:
            await stream.reset()
            raise
        return stream

    def _add(self, stream_id: int) -> MuxStream:
        stream = self.streams[stream_id] = MuxStream(self, stream_id)
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

    async def accept(self, stream: MuxStream) -> None:
        """Server: the stream may carry data."""
        self.conn.accept(stream.stream_id)
        await self.flush()

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
                await self.flush()
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
            # h2 frees a stream's slot as soon as the peer resets it, but its handler may
            # still be dialling the backend: cap the handlers, not h2's open streams, or
            # open-then-reset ("Rapid Reset") would bypass mux_max_streams.
            if (
                self._on_stream is None
                or self.draining
                or len(self.streams) > self.conn.max_streams
            ):
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
            for stream in self.streams.values():
                stream._window.set()
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
            target.peer_finished = True
            target._wake.set()
        elif isinstance(event, StreamAccepted):
            pass  # data flows from here on
        elif isinstance(event, StreamRefused):
            target.refused = event.status
            target._fail(f"refused by the peer (status {event.status})")
        elif isinstance(event, StreamBroken):
            target._fail(f"reset by the peer (code {event.code})")
        elif isinstance(event, WindowOpened):
            target._window.set()

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
                with contextlib.suppress(TlsStreamError):
                    await self.flush()

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
            gate.reset(self._writer)
            self.tls.abort(reason)  # settles an unfinished update's key (failed)
            for task in self._tasks:
                if task is not asyncio.current_task():
                    task.cancel()

    async def drain(self, why: str = "closed") -> None:
        """Take no new streams, wait until the open ones ended, then close cleanly."""
        self.draining = True
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
            with contextlib.suppress(TlsStreamError, ConnectionError):
                self.conn.close()
                await self.flush()
            await self.tls.close()
        await self._finish_tasks()

    async def _finish_tasks(self) -> None:
        for task in list(self._tasks):
            if task is not asyncio.current_task():
                task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
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
