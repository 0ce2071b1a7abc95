"""Key sources on an ETSI 014 client: a demand-sized master supply and a coalescing slave.

Master: a supply of ready keys for one (slave SAE, peer), sized by :mod:`qkdproxy.keys.supply`
from the measured take rate and KME round trip and refilled when a key is taken, so a
handshake takes its key from memory without keys being drawn for nobody. A key older than
``max_age_s`` is dropped unused (counted as expired), never handed out.
Slave: concurrent ``get_key`` calls made in the same event-loop turn become one ``dec_keys``
request with several key IDs (at most the KME's ``max_key_per_request``); after a refusal of
a multi-id request each id is asked for alone.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from qkdproxy.core.accounting import KeyAccount
from qkdproxy.core.keys import HeldKey, KeyNotFoundError, QkdKey, QkdKeyError
from qkdproxy.keys.etsi014_client import Etsi014Client
from qkdproxy.keys.loops import HeldLoop
from qkdproxy.keys.sources import RefusalStreak
from qkdproxy.keys.supply import MAX_PACED_BATCH, RefillLevels, SupplySettings, SupplySizer

MAX_COALESCED_IDS = 64


@dataclass(slots=True)
class PrefetchCounters:
    """Where the master's keys went."""

    prefetched: int = 0
    served_from_buffer: int = 0
    fetched_on_demand: int = 0
    expired: int = 0
    refill_errors: int = 0
    # Dropped after the peer refused buffered keys (see Etsi014Master.flush_after_refusal).
    flushed: int = 0
    # Dropped when the daemon stopped.
    stranded: int = 0


class Etsi014Master:
    """MasterKeySource: ``enc_keys`` towards one slave SAE, for one peer, from a supply held
    ahead when ``supply`` is given (else every key is fetched on demand).

    ``announces``: whether the supply's ids may be named to the peer ahead of use. Only a
    supply dedicated to one verified peer may (a client tunnel's); a server's supply is
    offered to whichever client connects, so naming its ids to one would give them away.
    """

    # The peer's dec_keys answered "not found": it sends illegal_parameter.
    refusal_alerts = frozenset({"illegal_parameter"})

    def __init__(
        self,
        client: Etsi014Client,
        slave_sae: str,
        supply: SupplySettings | None = None,
        clock: Callable[[], float] = time.monotonic,
        *,
        account: KeyAccount | None = None,
        announces: bool = True,
    ) -> None:
        self._client = client
        self._slave = slave_sae
        self._supply = SupplySizer(supply) if supply is not None else None
        self._clock = clock
        self._account = account or KeyAccount()
        self._announces = announces
        self._buffer: deque[HeldKey] = deque()
        self._refill: asyncio.Task[None] | None = None
        self._loop = HeldLoop()
        # The KME's max_key_per_request as last read (no cap known before the first refill).
        self._request_cap = MAX_PACED_BATCH
        # The first ``_announced`` keys of the buffer were named to the peer already.
        self._announced = 0
        self._streak = RefusalStreak()
        self._rate = SupplySizer(SupplySettings())
        self.counters = PrefetchCounters()
        # Bumped by each flush: a handshake that began before it took a suspect key.
        self.buffer_epoch = 0

    @property
    def depth(self) -> int:
        """Keys ready in the buffer (stale ones are dropped first)."""
        self._drop_stale()
        return len(self._buffer)

    @property
    def target(self) -> int:
        """Keys the supply aims to hold now (0 without a supply)."""
        return self._levels().high

    def _levels(self) -> RefillLevels:
        if self._supply is None:
            return RefillLevels(0, 0)
        return self._supply.refill_levels(self._clock(), self._request_cap)

    def consumption_per_s(self) -> float:
        """Keys taken per second over the last minute."""
        return self._rate.rate(self._clock())

    async def take_key(self) -> QkdKey:
        """A fresh key: from the buffer when one is there, else straight from the KME."""
        now = self._clock()
        self._rate.took(now)
        if self._supply is not None:
            self._supply.took(now)
        self._drop_stale()
        if self._buffer:
            key = self._pop().key
            self.counters.served_from_buffer += 1
        else:
            [key] = await self._client.enc_keys(self._slave, 1)
            self._account.draw()
            self.counters.fetched_on_demand += 1
        self.ensure_refill()
        return key

    def announce(self, limit: int) -> list[bytes]:
        """Ids of up to ``limit`` buffered keys not yet announced, in the order of use."""
        start = self._announced
        if not self._announces or start >= len(self._buffer):
            return []
        ids = [entry.key.key_id for entry in itertools.islice(self._buffer, start, start + limit)]
        self._announced += len(ids)
        return ids

    def flush_after_refusal(self) -> bool:
        """The peer refused a key from this supply (its KME does not know it). After
        ``REFUSALS_BEFORE_FLUSH`` refusals in a row, at most once per ``FLUSH_INTERVAL_S``,
        drop every buffered key and return True.

        Keys go missing at the peer's end when the peer daemon restarts (it fetched each key
        announced to it at once, and a KME delivers a key only once) or when the KMEs lose or
        expire keys (a KME restart). The other buffered keys are then suspect too. But the
        refusal is an unauthenticated alert: one of them alone costs only the key it named.
        True even when nothing was held: the caller retries once with a key drawn now.
        """
        if not self._streak.refused(self._clock()):
            return False
        self.counters.flushed += len(self._buffer)
        self._account.settle("flushed", len(self._buffer))
        self._buffer.clear()
        self._announced = 0
        self.buffer_epoch += 1
        self.ensure_refill()
        return True

    def note_accepted(self) -> None:
        """A handshake with one of our keys completed: the refusal streak is broken."""
        self._streak.accepted()

    def _pop(self) -> HeldKey:
        self._announced = max(0, self._announced - 1)
        return self._buffer.popleft()

    def ensure_refill(self) -> None:
        """Start a background refill if the supply is down to its refill level
        (``SupplySizer.refills``)."""
        if self._refill is not None and not self._refill.done():
            return  # looked at first: the levels cost more to work out
        if self._supply is not None and self._supply.refills(self._clock(), len(self._buffer)):
            self._refill = self._loop.get().create_task(self._fill())

    async def _batch_limit(self) -> int:
        # Real KMEs differ (some give one key per request): the client asks status once.
        return await self._client.max_keys_per_request(self._slave)

    async def _fill(self) -> None:
        assert self._supply is not None
        while True:
            # Read first: the levels a refill aims at depend on it.
            self._request_cap = await self._batch_limit()
            missing = self.target - len(self._buffer)
            if missing <= 0:
                return
            number = min(missing, self._request_cap)
            started = self._clock()
            try:
                keys = await self._client.enc_keys(self._slave, number)
            except QkdKeyError:
                # The breaker in the client paces retries; the next take_key tries again.
                self.counters.refill_errors += 1
                return
            now = self._clock()
            self._supply.round_trip(now - started)
            self._account.draw(len(keys))
            self._buffer.extend(HeldKey(k, now) for k in keys)
            self.counters.prefetched += len(keys)
            if missing <= self._request_cap and len(self._buffer) > self._levels().low:
                # The batch came whole (one of exactly the KME's limit too): the keys taken
                # during its round trip wait for the next refill (topping them up at once
                # made one small call per refill).
                return

    async def wait_refilled(self) -> None:
        """Return once the refill in progress (if any) has finished."""
        if self._refill is not None and not self._refill.done():
            await asyncio.shield(self._refill)

    def _drop_stale(self) -> None:
        max_age = self._supply.settings.max_age_s if self._supply else 0.0
        horizon = self._clock() - max_age
        while self._buffer and self._buffer[0].fetched_at < horizon:
            self._pop()
            self.counters.expired += 1
            self._account.settle("expired")
            if self._supply is not None:
                self._supply.aged_out()

    async def aclose(self) -> None:
        """Stop refilling and forget the buffered keys (counted as stranded)."""
        try:
            if self._refill is not None:
                self._refill.cancel()
                # Not a suppressed CancelledError: a cut of this close must not be swallowed.
                await asyncio.gather(self._refill, return_exceptions=True)
        finally:  # cut while the refill ends: the buffered keys are still settled
            self.counters.stranded += len(self._buffer)
            self._account.settle("stranded", len(self._buffer))
            self._buffer.clear()
            self._announced = 0


class Etsi014Slave:
    """SlaveKeySource: ``dec_keys`` from one master SAE, coalescing concurrent lookups."""

    def __init__(
        self, client: Etsi014Client, master_sae: str, account: KeyAccount | None = None
    ) -> None:
        self._client = client
        self._master = master_sae
        self._account = account or KeyAccount()
        self._waiting: dict[bytes, asyncio.Future[QkdKey]] = {}
        self._flush_scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop = HeldLoop()
        self.requests = 0

    async def get_key(self, key_id: bytes) -> QkdKey:
        """The key for ``key_id``; KeyNotFoundError if the KME has none for us."""
        key_id = bytes(key_id)
        if key_id in self._waiting:
            raise KeyNotFoundError("this key id is already being fetched")
        loop = self._loop.get()
        future: asyncio.Future[QkdKey] = loop.create_future()
        self._waiting[key_id] = future
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._start_flush)
        return await future

    def _start_flush(self) -> None:
        self._flush_scheduled = False
        batch = dict(list(self._waiting.items())[:MAX_COALESCED_IDS])
        for key_id in batch:
            del self._waiting[key_id]
        loop = self._loop.get()
        if self._waiting:
            self._flush_scheduled = True
            loop.call_soon(self._start_flush)
        task = loop.create_task(self._fetch(batch))
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
        self._account.draw(len(keys))
        for key in keys:
            future = batch[key.key_id]
            if not future.done():
                future.set_result(key)


def _settle(batch: dict[bytes, asyncio.Future[QkdKey]], error: BaseException) -> None:
    for future in batch.values():
        if not future.done():
            future.set_exception(error)
