"""ETSI 004 streams opened ahead of need, on both ends of a qkdproxy peer pair.

Initiator (client-initiated flow): streams are opened (KSID assigned by the KME) before any
handshake needs one, and their KSIDs are announced to the peer over ``qkdproxy/1``.
Responder: announced KSIDs are opened and key 0 fetched in the background; the KSIDs are then
announced back as acknowledgements. Initiator: an acknowledged stream is known to be open at
both ends, so its key 0 is fetched in the background too (no GET_KEY ever waits at the KME
for the peer). A handshake then finds its stream open and its key in memory at both ends.
KSIDs are random UUIDs, so each end tells its own streams from the peer's. Each key is still
delivered once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from qkdproxy.core.accounting import KeyAccount
from qkdproxy.core.keys import KeyNotFoundError, PeerNotConnectedError, QkdKeyError
from qkdproxy.keys.sources import RefusalStreak, StreamKeySource
from qkdproxy.keys.supply import SupplySettings, SupplySizer

KEY_INDEX = 0
# A stream a peer announced and we joined is closed unused once this many of our max_age_s
# old: the peer never uses a stream past its own max_age_s after opening it (before it
# announced it), so a peer configured with up to twice ours never names one we closed.
JOINED_AGE_FACTOR = 2


@dataclass(slots=True)
class StreamPrefetchCounters:
    """What became of streams opened ahead."""

    opened_ahead: int = 0
    served_open: int = 0
    opened_on_demand: int = 0
    keys_ahead: int = 0
    keys_served_from_cache: int = 0
    failures: int = 0
    # Closed unused after the peer refused one (see PrefetchingStreams.flush_after_refusal).
    flushed: int = 0
    # Closed unused for age (max_age_s) before a handshake took them.
    expired: int = 0


class PrefetchingStreams:
    """StreamKeySource that keeps streams open ahead and caches key 0.

    Without ``supply`` it keeps ``pool`` streams open; with it, as many as the demand needs
    (see :mod:`qkdproxy.keys.supply`), at most ``pool``, refilled only when one is taken.
    """

    # A responder that cannot open or fetch our stream fails on its KME call: internal_error
    # (e.g. "KSID already in use" after a restart); illegal_parameter for an unknown key.
    refusal_alerts = frozenset({"internal_error", "illegal_parameter"})

    def __init__(
        self,
        inner: StreamKeySource,
        pool: int = 32,
        max_age_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        concurrency: int = 16,
        *,
        supply: SupplySettings | None = None,
        account: KeyAccount | None = None,
        opens_ahead: bool = True,
    ) -> None:
        self._inner = inner
        self._pool_max = pool
        # False: a responder only (a server's): it joins the streams peers announce, opens
        # on demand what it initiates (an Extended Key Update), and never opens or announces
        # streams of its own, which it could offer to one client and then use with another.
        self._opens_ahead = opens_ahead
        self._supply = SupplySizer(supply) if supply is not None else None
        self._account = account or KeyAccount()
        self._concurrency = concurrency
        self._max_age_s = max_age_s
        self._clock = clock
        self._ready: deque[tuple[bytes, float]] = deque()
        self._announced = 0
        self._mine: set[bytes] = set()
        # Bounded as the streams we join are: an acknowledgement is sent on the next
        # connection's announcement, and a peer that keeps announcing on one connection
        # would otherwise grow it for as long as it stays.
        self._acks: deque[bytes] = deque(maxlen=4 * pool)
        # Streams the peer announced that we joined, not taken by a handshake yet: when.
        self._joined: dict[bytes, float] = {}
        self._keys: dict[bytes, bytes] = {}
        self._tasks: dict[bytes, asyncio.Task[None]] = {}
        self._refill: asyncio.Task[None] | None = None
        self.counters = StreamPrefetchCounters()
        # Bumped by each flush: a handshake that began before it used a suspect stream.
        self.buffer_epoch = 0
        self._streak = RefusalStreak()
        # Streams this end's handshakes and updates took (one key each): the take rate the
        # exhaustion gauge divides by, measured with or without a demand-sized supply.
        self._rate = SupplySizer(SupplySettings())

    @property
    def depth(self) -> int:
        """Streams open ahead, ready for a handshake."""
        return len(self._ready)

    def consumption_per_s(self) -> float:
        """Streams taken for handshakes and updates per second over the last minute."""
        return self._rate.rate(self._clock())

    @property
    def _pool_size(self) -> int:
        if not self._opens_ahead:
            return 0
        if self._supply is None:
            return self._pool_max
        return min(self._pool_max, self._supply.target(self._clock()))

    # ----------------------------------------------------------- initiator side

    def ensure_refill(self) -> None:
        """Open streams in the background until the pool is full."""
        # The running refill looked at first: the pool size costs more to work out.
        if (self._refill is None or self._refill.done()) and len(self._ready) < self._pool_size:
            self._refill = asyncio.create_task(self._fill())

    async def _fill(self) -> None:
        # ETSI 004 opens one stream per call: with a remote KME only concurrency keeps up.
        while (missing := self._pool_size - len(self._ready)) > 0:
            wave = min(missing, self._concurrency)
            started = self._clock()
            results = await asyncio.gather(
                *(self._inner.open(None) for _ in range(wave)), return_exceptions=True
            )
            if self._supply is not None:
                self._supply.round_trip(self._clock() - started)
            for result in results:
                if isinstance(result, bytes):
                    self._ready.append((result, self._clock()))
                    self.counters.opened_ahead += 1
                elif isinstance(result, QkdKeyError):
                    self.counters.failures += 1
                elif isinstance(result, BaseException):
                    raise result
            if any(isinstance(r, QkdKeyError) for r in results):
                return

    def announce(self, limit: int) -> list[bytes]:
        """Acknowledgements of the peer's streams we opened, then our own open streams not
        announced yet (in the order they will be used)."""
        self._drop_stale()
        acks = [self._acks.popleft() for _ in range(min(limit, len(self._acks)))]
        room = limit - len(acks)
        ours = [k for k, _ in list(self._ready)[self._announced : self._announced + room]]
        self._announced += len(ours)
        self._mine.update(ours)
        return acks + ours

    # ----------------------------------------------------------- responder side

    def announced(self, ksids: Sequence[bytes]) -> None:
        """From the peer: acknowledgements of our streams (fetch key 0 now that both ends
        are open), or, for a responder only, its own streams (open them, fetch key 0,
        acknowledge).

        A supply that opens streams ahead (a client's) joins none its peer names: its peer
        opens none ahead, so such a KSID is an acknowledgement that came after a handshake
        took the stream (joining it would open it again at the KME) or a made-up one."""
        self._drop_stale()
        # Joined streams whose key 0 did not come (yet) take room too, until they age out.
        held = len(self._keys.keys() | self._joined.keys())
        for ksid in map(bytes, ksids):
            if ksid in self._tasks or ksid in self._keys or ksid in self._joined:
                continue
            if len(self._tasks) + held >= 4 * self._pool_max:
                return
            if ksid in self._mine:
                self._start(ksid, self._fetch_key(ksid))
            elif not self._opens_ahead:
                self._start(ksid, self._open_and_fetch(ksid))

    async def _open_and_fetch(self, ksid: bytes) -> None:
        await self._inner.open(ksid)
        self._joined[ksid] = self._clock()
        try:
            await self._fetch_key(ksid)
        except (PeerNotConnectedError, KeyNotFoundError):
            # The peer has no such stream (made up, or closed already): close our end, which
            # would otherwise stay open at the KME until its TTL. After any other failure (a
            # KME short of key, unreachable) a handshake may still fetch key 0 on demand.
            if self._joined.pop(ksid, None) is not None:
                with contextlib.suppress(QkdKeyError):
                    await self._inner.close(ksid)
            raise
        self._acks.append(ksid)

    # ------------------------------------------------------------- both sides

    def _start(self, ksid: bytes, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(self._guarded(work))
        self._tasks[ksid] = task
        task.add_done_callback(lambda _: self._tasks.pop(ksid, None))

    async def _guarded(self, work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        except QkdKeyError:
            self.counters.failures += 1

    async def _fetch_key(self, ksid: bytes) -> None:
        self._keys[ksid] = await self._inner.get_key(ksid, KEY_INDEX)
        self._account.draw()
        self.counters.keys_ahead += 1

    async def open(self, ksid: bytes | None) -> bytes:
        """An open stream: from the pool (initiator) or opened ahead (responder) if possible."""
        if ksid is None:
            now = self._clock()
            self._rate.took(now)
            if self._supply is not None:
                self._supply.took(now)
            self._drop_stale()
            if self._ready:
                ksid, _ = self._ready.popleft()
                self._announced = max(0, self._announced - 1)
                self._mine.discard(ksid)
                self.counters.served_open += 1
                self.ensure_refill()
                return ksid
            self.ensure_refill()
            self.counters.opened_on_demand += 1
            return await self._inner.open(None)
        ksid = bytes(ksid)
        task = self._tasks.get(ksid)
        if task is not None:
            await asyncio.shield(task)
        if self._joined.pop(ksid, None) is not None:
            self.counters.served_open += 1
            return ksid
        return await self._inner.open(ksid)

    async def get_key(self, ksid: bytes, index: int) -> bytes:
        """Key ``index``: key 0 from memory when it was fetched ahead."""
        ksid = bytes(ksid)
        task = self._tasks.get(ksid)
        if task is not None and index == KEY_INDEX:
            await asyncio.shield(task)
        key = self._keys.pop(ksid, None) if index == KEY_INDEX else None
        if key is not None:
            self.counters.keys_served_from_cache += 1
            return key
        key = await self._inner.get_key(ksid, index)
        self._account.draw()
        return key

    async def close(self, ksid: bytes) -> None:
        """Close the stream and forget anything cached for it."""
        self._forget_key(bytes(ksid), "expired")
        self._mine.discard(bytes(ksid))
        await self._inner.close(ksid)

    def flush_after_refusal(self) -> bool:
        """The peer refused a stream we opened ahead. After ``REFUSALS_BEFORE_FLUSH``
        refusals in a row (at most once per ``FLUSH_INTERVAL_S``) close them all, open new
        ones and return True.

        A responder that restarted cannot join the streams its previous process had opened
        (the KME answers "KSID already in use" for the same application): without this, every
        stream announced before the restart would cost a failed connection. But the refusal
        is an unauthenticated alert: one alone costs only the stream it named.
        """
        if not self._streak.refused(self._clock()):
            return False
        self.counters.flushed += len(self._ready)
        while self._ready:
            ksid, _ = self._ready.popleft()
            self._mine.discard(ksid)
            self._forget_key(ksid, "flushed")
            self._start(ksid, self._inner.close(ksid))
        self._announced = 0
        self.buffer_epoch += 1
        self.ensure_refill()
        return True

    def note_accepted(self) -> None:
        """A handshake with one of our streams completed: the refusal streak is broken."""
        self._streak.accepted()

    def _forget_key(self, ksid: bytes, fate: str) -> None:
        if self._keys.pop(ksid, None) is not None:
            self._account.settle(fate)

    def _drop_stale(self) -> None:
        now = self._clock()
        horizon = now - self._max_age_s
        while self._ready and self._ready[0][1] < horizon:
            ksid, _ = self._ready.popleft()
            self._announced = max(0, self._announced - 1)
            self._mine.discard(ksid)
            self._forget_key(ksid, "expired")
            self.counters.expired += 1
            self._start(ksid, self._inner.close(ksid))
        # The peer's streams we joined: it closed them unused (aged out, flushed, or its
        # tunnel dials another peer now); without this their keys 0 were held until we
        # stopped, and filled the bound on what we join (4 x pool) for good.
        horizon = now - JOINED_AGE_FACTOR * self._max_age_s
        aged = {
            k for k, joined in self._joined.items() if joined < horizon and k not in self._tasks
        }
        if not aged:
            return
        self._acks = deque((k for k in self._acks if k not in aged), self._acks.maxlen)
        for ksid in aged:
            del self._joined[ksid]
            self._forget_key(ksid, "expired")
            self._start(ksid, self._inner.close(ksid))

    async def wait_idle(self) -> None:
        """Return once background opening and fetching have finished."""
        # Finished tasks leave ``_tasks`` in a callback: only unfinished ones are waited for
        # (see KeyContext.drain: from Python 3.12 a gather of finished tasks never yields).
        while pending := [
            task for task in (*self._tasks.values(), self._refill)
            if task is not None and not task.done()
        ]:  # fmt: skip
            await asyncio.gather(*map(asyncio.shield, pending), return_exceptions=True)

    async def aclose(self) -> None:
        """Stop background work and close the streams opened ahead or joined (best
        effort)."""
        for task in [*self._tasks.values(), *([self._refill] if self._refill else [])]:
            task.cancel()
        try:
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)
            for ksid in [*(k for k, _ in self._ready), *self._joined]:
                with contextlib.suppress(QkdKeyError):
                    await self._inner.close(ksid)
        finally:  # cut while closing (the daemon stops now): the keys held are still settled
            self._ready.clear()
            self._joined.clear()
            self._account.settle("stranded", len(self._keys))
            self._keys.clear()
