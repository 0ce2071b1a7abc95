"""Key sources on an ETSI 014 client: a prefetching master and a coalescing slave.

Master: a buffer of ready keys per slave SAE, refilled in the background in batches between
a low and a high watermark, so a handshake takes its key from memory. A key older than
``max_age_s`` is dropped unused (counted as expired), never handed out.
Slave: concurrent ``get_key`` calls made in the same event-loop turn become one ``dec_keys``
request with several key IDs (at most the KME's ``max_key_per_request``); after a refusal of
a multi-id request each id is asked for alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from qkdproxy.etsi014.client import Etsi014Client
from qkdproxy.qkd.keys import HeldKey, KeyNotFoundError, QkdKey, QkdKeyError
from qkdproxy.qkd.sources import FLUSH_INTERVAL_S

MAX_COALESCED_IDS = 64


@dataclass(frozen=True, slots=True)
class PrefetchSettings:
    """Buffer watermarks; ``high == 0`` turns prefetching off."""

    # Sized for a remote KME (100 ms per call) and a few hundred handshakes per second: one
    # batch arrives before the buffer drains from ``low``.
    low: int = 48
    high: int = 128
    batch: int = 64
    max_age_s: float = 120.0

    def __post_init__(self) -> None:
        if not 0 <= self.low <= self.high or self.batch < 1 or self.max_age_s <= 0:
            raise ValueError("need 0 <= low <= high, batch >= 1 and max_age_s > 0")


@dataclass(slots=True)
class PrefetchCounters:
    """Where the master's keys went."""

    prefetched: int = 0
    served_from_buffer: int = 0
    fetched_on_demand: int = 0
    expired: int = 0
    refill_errors: int = 0
    # Dropped after the peer refused a buffered key (see Etsi014Master.flush_after_refusal).
    flushed: int = 0


class Etsi014Master:
    """MasterKeySource: ``enc_keys`` towards one slave SAE, from a prefetch buffer if enabled."""

    # The peer's dec_keys answered "not found": it sends illegal_parameter.
    refusal_alerts = frozenset({"illegal_parameter"})

    def __init__(
        self,
        client: Etsi014Client,
        slave_sae: str,
        prefetch: PrefetchSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._slave = slave_sae
        self._prefetch = prefetch or PrefetchSettings(low=0, high=0)
        self._clock = clock
        self._buffer: deque[HeldKey] = deque()
        self._refill: asyncio.Task[None] | None = None
        # The first ``_announced`` keys of the buffer were named to the peer already.
        self._announced = 0
        self._max_per_request: int | None = None
        self._takes: deque[float] = deque()
        self.counters = PrefetchCounters()
        # Bumped by each flush: a handshake that began before it took a suspect key.
        self.buffer_epoch = 0
        self._last_flush = -FLUSH_INTERVAL_S

    @property
    def depth(self) -> int:
        """Keys ready in the buffer."""
        return len(self._buffer)

    def consumption_per_s(self, window_s: float = 60.0) -> float:
        """Keys taken per second over the last ``window_s`` seconds."""
        horizon = self._clock() - window_s
        while self._takes and self._takes[0] < horizon:
            self._takes.popleft()
        return len(self._takes) / window_s

    async def take_key(self) -> QkdKey:
        """A fresh key: from the buffer when one is there, else straight from the KME."""
        self._takes.append(self._clock())
        self._drop_stale()
        if self._buffer:
            key = self._pop().key
            self.counters.served_from_buffer += 1
        else:
            [key] = await self._client.enc_keys(self._slave, 1)
            self.counters.fetched_on_demand += 1
        self.ensure_refill()
        return key

    def announce(self, limit: int) -> list[bytes]:
        """Ids of up to ``limit`` buffered keys not yet announced, in the order of use."""
        ids = [
            entry.key.key_id
            for entry in list(self._buffer)[self._announced : self._announced + limit]
        ]
        self._announced += len(ids)
        return ids

    def flush_after_refusal(self) -> bool:
        """The peer refused a key from this buffer (its KME does not know it): drop every
        buffered key and return True, or False if there was nothing to drop or a flush
        happened less than ``FLUSH_INTERVAL_S`` ago.

        Keys go missing at the peer's end when the peer daemon restarts (it fetched each key
        announced to it at once, and a KME delivers a key only once) or when the KMEs lose or
        expire keys (a KME restart). The other buffered keys are then suspect too; without
        this, each of them (up to the whole buffer) would cost a failed connection. The
        refusal is an unauthenticated alert, hence the rate limit: a forged one must not be
        able to drain the KME pool.
        """
        now = self._clock()
        if not self._buffer or now - self._last_flush < FLUSH_INTERVAL_S:
            return False
        self._last_flush = now
        self.counters.flushed += len(self._buffer)
        self._buffer.clear()
        self._announced = 0
        self.buffer_epoch += 1
        self.ensure_refill()
        return True

    def _pop(self) -> HeldKey:
        self._announced = max(0, self._announced - 1)
        return self._buffer.popleft()

    def ensure_refill(self) -> None:
        """Start a background refill if the buffer is at or below its low watermark."""
        if (
            self._prefetch.high
            and len(self._buffer) <= self._prefetch.low
            and (self._refill is None or self._refill.done())
        ):
            self._refill = asyncio.create_task(self._fill())

    async def _batch_limit(self) -> int:
        # Real KMEs differ (some give one key per request): ask once, remember.
        if self._max_per_request is None:
            try:
                status = await self._client.status(self._slave)
            except QkdKeyError:
                return 1
            self._max_per_request = status.max_key_per_request
        return self._max_per_request

    async def _fill(self) -> None:
        while len(self._buffer) < self._prefetch.high:
            limit = await self._batch_limit()
            number = min(self._prefetch.batch, self._prefetch.high - len(self._buffer), limit)
            try:
                keys = await self._client.enc_keys(self._slave, number)
            except QkdKeyError:
                # The breaker in the client paces retries; the next take_key tries again.
                self.counters.refill_errors += 1
                return
            now = self._clock()
            self._buffer.extend(HeldKey(k, now) for k in keys)
            self.counters.prefetched += len(keys)

    async def wait_refilled(self) -> None:
        """Return once the refill in progress (if any) has finished."""
        if self._refill is not None and not self._refill.done():
            await asyncio.shield(self._refill)

    def _drop_stale(self) -> None:
        horizon = self._clock() - self._prefetch.max_age_s
        while self._buffer and self._buffer[0].fetched_at < horizon:
            self._pop()
            self.counters.expired += 1

    async def aclose(self) -> None:
        """Stop refilling and forget the buffered keys."""
        if self._refill is not None:
            self._refill.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refill
        self._buffer.clear()
        self._announced = 0


class Etsi014Slave:
    """SlaveKeySource: ``dec_keys`` from one master SAE, coalescing concurrent lookups."""

    def __init__(self, client: Etsi014Client, master_sae: str) -> None:
        self._client = client
        self._master = master_sae
        self._waiting: dict[bytes, asyncio.Future[QkdKey]] = {}
        self._flush_scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.requests = 0

    async def get_key(self, key_id: bytes) -> QkdKey:
        """The key for ``key_id``; KeyNotFoundError if the KME has none for us."""
        key_id = bytes(key_id)
        if key_id in self._waiting:
            raise KeyNotFoundError("this key id is already being fetched")
        future: asyncio.Future[QkdKey] = asyncio.get_running_loop().create_future()
        self._waiting[key_id] = future
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._start_flush)
        return await future

    def _start_flush(self) -> None:
        self._flush_scheduled = False
        batch = dict(list(self._waiting.items())[:MAX_COALESCED_IDS])
        for key_id in batch:
            del self._waiting[key_id]
        if self._waiting:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._start_flush)
        task = asyncio.ensure_future(self._fetch(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _fetch(self, batch: dict[bytes, asyncio.Future[QkdKey]]) -> None:
        # Batch-size cap (issue 19): never more ids per dec_keys than the KME's
        # max_key_per_request, which the client reads from status.
        cap = await self._client.max_keys_per_request(self._master)
        if len(batch) > cap:
            items = list(batch.items())
            parts = (dict(items[i : i + cap]) for i in range(0, len(items), cap))
            await asyncio.gather(*(self._fetch(part) for part in parts))
            return
        self.requests += 1
        try:
            keys = await self._client.dec_keys(self._master, list(batch))
        except KeyNotFoundError as exc:
            if len(batch) == 1:
                _settle(batch, error=exc)
                return
            # dec_keys is all or nothing: one bad id must not fail its neighbours.
            await asyncio.gather(*(self._fetch({k: f}) for k, f in batch.items()))
            return
        except Exception as exc:
            _settle(batch, error=exc)
            return
        for key in keys:
            future = batch[key.key_id]
            if not future.done():
                future.set_result(key)


def _settle(batch: dict[bytes, asyncio.Future[QkdKey]], error: BaseException) -> None:
    for future in batch.values():
        if not future.done():
            future.set_exception(error)
