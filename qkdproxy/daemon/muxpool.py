"""A client tunnel's pool of multiplexed tunnels to its peer.

Each application connection gets a stream on the oldest tunnel with room, so load packs
onto few tunnels and the others can go idle. The pool grows (one establishment at a time)
when every tunnel is full, keeps ``mux_pool_min`` established ahead of need, closes idle
tunnels beyond that, and rotates make-before-break: a tunnel past its time or byte budget
is replaced by one with a fresh QKD key first, then drains. A failed establishment backs
off (doubling up to a cap) before the next; meanwhile new connections fail at once rather
than queue behind a peer that is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from qkdproxy.daemon.config import MuxSettings
from qkdproxy.daemon.muxconn import MuxStream, MuxStreamError, MuxTunnel, TunnelFullError
from qkdproxy.io.tls_stream import TlsStream

log = logging.getLogger("qkdproxy.mux")
BACKOFF_FIRST_S = 0.25
BACKOFF_MAX_S = 30.0
# After a peer answered without the mux protocol, ask again only after this long.
UNSUPPORTED_RETRY_S = 60.0
# How often one application connection is sent again on another stream when the server
# did not process it (REFUSED_STREAM, or above its GOAWAY's last stream id). Each retry
# takes a stream as a new connection would (the pool's limits and backoff apply), so a
# peer that refuses everything costs a connection at most this many more attempts.
STREAM_RETRIES = 2


@dataclass(frozen=True, slots=True)
class PlainTunnel:
    """An established tunnel whose peer did not choose ``qkdproxy-mux/1``: it carries the
    one connection that asked for it, the per-connection way."""

    stream: TlsStream
    writer: asyncio.StreamWriter


Dial = Callable[[], Awaitable[MuxTunnel | PlainTunnel]]


def rotation_due(tunnel: MuxTunnel, settings: MuxSettings, now: float) -> bool:
    """The tunnel has carried enough (time or bytes) to be replaced."""
    aged = bool(settings.rotate_s) and now - tunnel.started >= settings.rotate_s
    used = bool(settings.rotate_bytes) and tunnel.bytes_moved >= settings.rotate_bytes
    return aged or used


class MuxPool:
    """Streams to one peer over a bounded, self-renewing set of tunnels."""

    def __init__(
        self,
        settings: MuxSettings,
        dial: Dial,
        *,
        wait_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self._dial = dial
        self._wait_s = wait_s
        self._clock = clock
        self.tunnels: list[MuxTunnel] = []
        self.draining: set[MuxTunnel] = set()
        self.rotations = 0
        self.establish_failures = 0
        self._growing: asyncio.Future[None] | None = None
        # Reloads met by the establishment under way: its tunnel, authenticated under the
        # settings before them, is checked as the established ones were (see reconfigured).
        self._reloads_meanwhile: list[tuple[Callable[[MuxTunnel], bool], str]] = []
        self._changed = asyncio.Event()
        self._backoff_s = 0.0
        self._retry_at = 0.0
        self._last_error: BaseException | None = None
        self._unsupported_until = 0.0
        self._tasks: set[asyncio.Task[None]] = set()
        self._maintainer: asyncio.Task[None] | None = None
        # Set by stop (and close): the listener closed, no new connection will come.
        self._stopping = False
        self._in_round = False

    # ------------------------------------------------------------------ streams

    async def open(self) -> MuxStream | PlainTunnel | None:
        """A stream for one application connection; a :class:`PlainTunnel` (or None: dial
        one yourself) when the peer does not multiplex. Raises what establishing raised
        (HandshakeError, OSError) or TimeoutError when every tunnel stayed full."""
        # The usual case, a tunnel with room: no deadline to arm.
        if (stream := self._open_now()) is not None:
            return stream
        async with asyncio.timeout(self._wait_s):
            while True:
                if self._clock() < self._unsupported_until:
                    return None
                if (stream := self._open_now()) is not None:
                    return stream
                if len(self.tunnels) < self.settings.pool_max:
                    plain = await self._grow()
                    if plain is not None:
                        return plain
                    continue
                self._changed.clear()
                await self._changed.wait()

    def _open_now(self) -> MuxStream | None:
        """A stream of a tunnel with room, if there is one (its caller pumps it at once:
        the request leaves with the first data)."""
        while (tunnel := self._with_room()) is not None:
            try:
                return tunnel.open_stream()
            except TunnelFullError:
                continue  # nothing was sent: look again
            except MuxStreamError:
                if tunnel.alive:
                    raise  # refused by the peer (its status says why)
            # it broke meanwhile: another one
        return None

    def _with_room(self) -> MuxTunnel | None:
        self._drop_ended()
        for tunnel in self.tunnels:
            if tunnel.conn.capacity > 0:
                return tunnel
        return None

    def _drop_ended(self) -> None:
        """Forget tunnels that ended; retire those the peer sent GOAWAY on (it is draining):
        they take no new stream, so they no longer count toward ``mux_pool_max`` (with
        one tunnel at most, connections would otherwise wait for its last stream).

        One that left every stream it carried unprocessed did no work for its QKD key: a
        failed establishment (it backs off). Otherwise a peer that disowns the first
        stream of every tunnel would have each attempt of a connection (the first and its
        resends) establish a tunnel of its own. A stream the peer took ends its
        connection's attempts, so tunnels that took one cost at most a key per connection."""
        leaving = [t for t in self.tunnels if not t.alive or t.draining]
        for tunnel in leaving:
            self.tunnels.remove(tunnel)
            if tunnel.alive:
                self._retire(tunnel, "closed")
            if tunnel.disowned_all:
                self._failed(MuxStreamError("the peer processed no stream of its tunnel"))

    async def _grow(self) -> PlainTunnel | None:
        """Establish one more tunnel (or wait for the one being established)."""
        if self._growing is not None:
            await asyncio.shield(self._growing)
            return None
        now = self._clock()
        if now < self._retry_at and self._last_error is not None:
            # Each raise would add its frames to the one exception object (and keep them,
            # with their connections' locals, alive until the next failure): only ours.
            raise self._last_error.with_traceback(None)
        self._growing = asyncio.get_running_loop().create_future()
        try:
            return await self._establish()
        finally:
            self._growing.set_result(None)
            self._growing = None

    async def _establish(self) -> PlainTunnel | None:
        self._reloads_meanwhile = []
        try:
            made = await self._dial()
            if isinstance(made, MuxTunnel):
                await self._settle(made)
        except (OSError, Exception) as exc:
            self._failed(exc)
            raise
        self._backoff_s, self._last_error = 0.0, None
        if isinstance(made, PlainTunnel):
            self._unsupported_until = self._clock() + UNSUPPORTED_RETRY_S
            return made
        stale = [why for is_stale, why in self._reloads_meanwhile if is_stale(made)]
        if stale:
            self._retire(made, stale[0])  # the next round establishes one that meets them
            return None
        made.on_change = self._changed.set
        self.tunnels.append(made)
        self._changed.set()
        return None

    def _failed(self, exc: BaseException) -> None:
        """An establishment failed: the next one waits (doubling up to a cap), and until
        then connections that need one get ``exc``."""
        self.establish_failures += 1
        self._last_error = exc
        self._backoff_s = min(BACKOFF_MAX_S, max(BACKOFF_FIRST_S, self._backoff_s * 2))
        self._retry_at = self._clock() + self._backoff_s

    async def _settle(self, tunnel: MuxTunnel) -> None:
        """Wait for the peer's SETTINGS before the tunnel takes streams: its stream limit
        may be lower than ours, and opening past it would end the tunnel."""
        try:
            async with asyncio.timeout(self._wait_s):
                settled = await tunnel.wait_settled()
        except BaseException as exc:
            # The tunnel never joined the pool, so nothing else would ever close it. Only a
            # deadline is the peer's fault: cut by our own stop, the tunnel was closed by us
            # (its line must not blame the peer for our shutdown).
            cut = isinstance(exc, asyncio.CancelledError) and self._stopping
            self._retire(tunnel, "closed" if cut else "no SETTINGS from the peer")
            raise
        if tunnel.draining:
            # GOAWAY before a single stream: a peer going away (or a hostile one) would
            # otherwise have the pool spend a QKD key per connection. A failed
            # establishment: it backs off.
            self._retire(tunnel, "closed")
            raise MuxStreamError("the peer sent GOAWAY before taking a stream")
        if not settled:
            raise ConnectionError(f"tunnel ended before the peer's SETTINGS: {tunnel.reason}")

    # -------------------------------------------------------------- maintenance

    def start(self) -> None:
        """Keep the pool within its limits in the background."""
        self._maintainer = asyncio.create_task(self._maintain())

    def stop(self) -> None:
        """No new connection will ask for a stream (the listener closed): stop rotating and
        refilling, each of which would spend a QKD key on a tunnel about to close. A round
        in progress finishes (see :attr:`maintainer`); cut, it would leave a handshake
        half done and its key wasted at both ends."""
        self._stopping = True
        if self._maintainer is not None and not self._in_round:
            self._maintainer.cancel()

    @property
    def maintainer(self) -> asyncio.Task[None] | None:
        """The background task; after :meth:`stop` it ends with its round."""
        return self._maintainer

    @property
    def tick_s(self) -> float:
        """How often the pool looks at its tunnels."""
        budgets = [1.0, self.settings.idle_s / 10]
        if self.settings.rotate_s:
            budgets.append(self.settings.rotate_s / 10)
        return max(0.05, min(budgets))

    async def _maintain(self) -> None:
        while not self._stopping:
            self._in_round = True
            with contextlib.suppress(Exception):
                await self.maintain()
            self._in_round = False
            if not self._stopping:
                await asyncio.sleep(self.tick_s)

    async def maintain(self) -> None:
        """One round: rotate, shrink, refill to the minimum (errors back off)."""
        now = self._clock()
        self._drop_ended()
        for tunnel in list(self.tunnels):
            if self._stopping:
                return
            if rotation_due(tunnel, self.settings, now):
                await self._rotate(tunnel)
            elif (
                not tunnel.streams
                and now - tunnel.last_busy >= self.settings.idle_s
                and len(self.tunnels) > self.settings.pool_min
            ):
                self._retire(tunnel, "idle")
        while (
            not self._stopping
            and len(self.tunnels) < self.settings.pool_min
            and self._clock() >= self._retry_at
            and self._clock() >= self._unsupported_until
        ):
            plain = await self._grow()
            if plain is not None:
                # Asked ahead of need: nobody waits for this connection.
                await plain.stream.close()

    async def _rotate(self, old: MuxTunnel) -> None:
        """Make before break: the new tunnel first, then the old one drains."""
        if self._clock() < self._retry_at:
            return
        plain = await self._grow()
        if plain is not None:
            await plain.stream.close()
            return
        self.rotations += 1
        self._retire(old, "rotated")

    def reconfigured(self, stale: Callable[[MuxTunnel], bool], why: str) -> None:
        """A reload: retire the established tunnels ``stale`` names (what they were
        authenticated against changed): they take no new stream, their open streams
        finish, and the next connection that finds no room establishes a tunnel. The next
        establishment may go at once (the failure that set the backoff was met under the old
        settings), but the backoff keeps its level: a peer that fails every establishment
        gets one more QKD key per reload, not a fresh run of short waits."""
        for tunnel in [t for t in self.tunnels if stale(t)]:
            self._retire(tunnel, why)
        if self._growing is not None:
            self._reloads_meanwhile.append((stale, why))
        self._retry_at, self._last_error = 0.0, None
        self._changed.set()

    def _retire(self, tunnel: MuxTunnel, why: str) -> None:
        with contextlib.suppress(ValueError):
            self.tunnels.remove(tunnel)
        self.draining.add(tunnel)
        task = asyncio.create_task(tunnel.drain(why))
        self._tasks.add(task)

        def done(_: object) -> None:
            self._tasks.discard(task)
            self.draining.discard(tunnel)

        task.add_done_callback(done)

    async def close(self) -> None:
        """Stop maintenance (a round in progress is cut) and close every tunnel (open
        streams are reset)."""
        self._stopping = True
        if self._maintainer is not None:
            self._maintainer.cancel()
            await asyncio.gather(self._maintainer, return_exceptions=True)
        for tunnel in [*self.tunnels, *self.draining]:
            await tunnel.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.tunnels.clear()
