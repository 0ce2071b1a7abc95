"""Slave-side prefetch driven by the peer's announcements of upcoming key ids.

The master end tells its qkdproxy peer which key ids it will use next (inside the encrypted
tunnel, see :mod:`qkdproxy.core.peer.frames`); :class:`AnnouncedSlave` fetches those keys in the
background, so the handshake that later names one finds it in memory. Keys are still
delivered at most once: a cached key is removed when it is handed out.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeGuard, runtime_checkable

from qkdproxy.core.accounting import KeyAccount
from qkdproxy.core.keys import HeldKey, KeyNotFoundError, QkdKey, QkdKeyError
from qkdproxy.keys.loops import HeldLoop
from qkdproxy.keys.sources import SlaveKeySource, conforms

SERVED_MEMORY = 4096


@runtime_checkable
class Announcer(Protocol):
    """A master source that can name the keys it will hand out next."""

    def announce(self, limit: int) -> list[bytes]:
        """Up to ``limit`` key ids not announced before, in the order they will be used."""
        ...


@runtime_checkable
class AnnouncementSink(Protocol):
    """A slave source that can act on announced key ids."""

    def announced(self, key_ids: Sequence[bytes]) -> None:
        """Start fetching these ids ahead of need."""
        ...


def is_announcer(source: object) -> TypeGuard[Announcer]:
    """``source`` can name the keys it hands out next (:class:`Announcer`)."""
    return conforms(source, Announcer)


def is_announcement_sink(source: object) -> TypeGuard[AnnouncementSink]:
    """``source`` acts on announced key ids (:class:`AnnouncementSink`)."""
    return conforms(source, AnnouncementSink)


@dataclass(slots=True)
class AnnouncedCounters:
    """What became of announced keys."""

    announced: int = 0
    prefetched: int = 0
    served_from_cache: int = 0
    # Of those, served only after waiting for the announced key's fetch to finish.
    served_after_wait: int = 0
    # Asked for an id not (or no longer) announced: fetched while the handshake waited.
    fetched_unannounced: int = 0
    fetch_failed: int = 0
    dropped_full: int = 0
    expired: int = 0


class AnnouncedSlave:
    """SlaveKeySource that serves announced keys from memory and the rest from ``inner``."""

    def __init__(
        self,
        inner: SlaveKeySource,
        max_keys: int = 256,
        max_age_s: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
        account: KeyAccount | None = None,
    ) -> None:
        self._inner = inner
        # Told of keys dropped here; the inner source counts the keys drawn.
        self._account = account or KeyAccount()
        self._max_keys = max_keys
        self._max_age_s = max_age_s
        self._clock = clock
        self._cache: dict[bytes, HeldKey] = {}
        self._inflight: dict[bytes, asyncio.Task[None]] = {}
        self._loop = HeldLoop()
        # Ids already handed out (bounded): a late announcement must not fetch them again.
        self._served: OrderedDict[bytes, None] = OrderedDict()
        self.counters = AnnouncedCounters()

    @property
    def depth(self) -> int:
        """Announced keys ready in memory."""
        return len(self._cache)

    def announced(self, key_ids: Sequence[bytes]) -> None:
        """Fetch these ids in the background (bounded; duplicates ignored)."""
        self._expire()
        for key_id in map(bytes, key_ids):
            if key_id in self._cache or key_id in self._inflight or key_id in self._served:
                continue
            if len(self._cache) + len(self._inflight) >= self._max_keys:
                self.counters.dropped_full += 1
                continue
            self.counters.announced += 1
            self._inflight[key_id] = self._loop.get().create_task(self._fetch(key_id))

    async def _fetch(self, key_id: bytes) -> None:
        try:
            key = await self._inner.get_key(key_id)
        except QkdKeyError:
            self.counters.fetch_failed += 1
        else:
            self._cache[key_id] = HeldKey(key, self._clock())
            self.counters.prefetched += 1
        finally:
            self._inflight.pop(key_id, None)

    async def get_key(self, key_id: bytes) -> QkdKey:
        """From memory when announced (waiting for an in-flight fetch), else from ``inner``."""
        key_id = bytes(key_id)
        self._remember_served(key_id)
        task = self._inflight.get(key_id)
        if task is not None:
            await asyncio.shield(task)
        self._expire()
        cached = self._cache.pop(key_id, None)
        if cached is not None:
            self.counters.served_from_cache += 1
            self.counters.served_after_wait += task is not None
            return cached.key
        if task is not None:
            raise KeyNotFoundError("announced key could not be fetched")
        self.counters.fetched_unannounced += 1
        return await self._inner.get_key(key_id)

    def _remember_served(self, key_id: bytes) -> None:
        self._served[key_id] = None
        if len(self._served) > SERVED_MEMORY:
            self._served.popitem(last=False)

    async def wait_fetched(self) -> None:
        """Return once every announced key in flight has been fetched (or failed)."""
        while self._inflight:
            await asyncio.gather(*map(asyncio.shield, self._inflight.values()))

    def _expire(self) -> None:
        horizon = self._clock() - self._max_age_s
        # Keys enter the cache as their fetches end, so oldest first: the expired ones lead
        # (and a look at the first key does when none is, as nearly always).
        cache = self._cache
        while cache:
            key_id = next(iter(cache))
            if cache[key_id].fetched_at >= horizon:
                return
            del cache[key_id]
            self.counters.expired += 1
            self._account.settle("expired")

    async def aclose(self) -> None:
        """Cancel fetches and forget cached keys."""
        for task in list(self._inflight.values()):
            task.cancel()
        await asyncio.gather(*self._inflight.values(), return_exceptions=True)
        self._account.settle("stranded", len(self._cache))
        self._cache.clear()
