"""Token buckets, alone and per source address (pure: time is passed in).

Admission control and the pre-authentication key budget both ask the same question: may
this source (or everyone together) do one more costly thing now? A source is an IPv4
address or an IPv6 /64, because one IPv6 host usually owns a whole /64 and could otherwise
rotate addresses to get a fresh budget for every connection.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache

# Recent sources' keys: parsing an address costs 5 us (IPv4) to 30 us (IPv6), asked for
# every connection. Bounded, so many sources only make it miss.
SOURCE_KEY_CACHE = 4096


@lru_cache(maxsize=SOURCE_KEY_CACHE)
def source_key(host: str) -> str:
    """The budget a peer address belongs to: the IPv4 address itself, the /64 of an IPv6
    address (an IPv4-mapped IPv6 address counts as its IPv4 address), or the text as given
    when it is not an IP address (a Unix socket peer, for example)."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


@dataclass(slots=True)
class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; starts full."""

    rate: float
    burst: float
    _tokens: float = -1.0
    _stamp: float = 0.0

    def _refill(self, now: float) -> None:
        if self._tokens < 0:
            self._tokens, self._stamp = self.burst, now
            return
        if now > self._stamp:
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now

    def take(self, now: float, cost: float = 1.0) -> bool:
        """Spend ``cost`` tokens if there are that many; False (and nothing spent) if not."""
        self._refill(now)
        if self._tokens < cost:
            return False
        self._tokens -= cost
        return True

    def available(self, now: float) -> float:
        """Tokens that could be spent now."""
        self._refill(now)
        return self._tokens

    def full(self, now: float) -> bool:
        """True when the bucket has refilled completely (it can be forgotten)."""
        return self.available(now) >= self.burst


class SourceBuckets:
    """One token bucket per source, bounded in number so that an attacker with many
    addresses cannot grow memory: when ``max_sources`` are tracked, full buckets are
    forgotten first, then the least recently used one (which errs towards admitting)."""

    def __init__(self, rate: float, burst: float, max_sources: int = 4096) -> None:
        if rate < 0 or burst < 1 or max_sources < 1:
            raise ValueError("rate >= 0, burst >= 1 and max_sources >= 1 are required")
        self.rate = rate
        self.burst = burst
        self.max_sources = max_sources
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def take(self, source: str, now: float, cost: float = 1.0) -> bool:
        """Spend from ``source``'s bucket (a key from :func:`source_key`)."""
        bucket = self._buckets.get(source)
        if bucket is None:
            self._make_room(now)
            bucket = self._buckets[source] = TokenBucket(self.rate, self.burst)
        else:
            self._buckets.move_to_end(source)
        return bucket.take(now, cost)

    def __len__(self) -> int:
        return len(self._buckets)

    def peek(self, source: str, now: float) -> float:
        """Tokens ``source`` could spend now, without spending or tracking anything (an
        untracked source has a full bucket)."""
        bucket = self._buckets.get(source)
        return self.burst if bucket is None else bucket.available(now)

    def _make_room(self, now: float) -> None:
        if len(self._buckets) < self.max_sources:
            return
        for key in [k for k, b in self._buckets.items() if b.full(now)]:
            del self._buckets[key]
        while len(self._buckets) >= self.max_sources:
            self._buckets.popitem(last=False)
