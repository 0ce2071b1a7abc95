"""ETSI 004 responder side: KME work on behalf of an unauthenticated ClientHello, bounded.

A server that gets a ClientHello naming a KSID opens that stream at its KME and asks for
key 0, before the client has proved who it is. A KSID the KME does not know makes GET_KEY
wait for a peer that never comes, holding one of the few pooled KME connections. So while a
handshake is served for a source (:data:`HELLO_SOURCE`, set by the tunnel runtime until the
peer is authenticated), calls for peer-supplied KSIDs are limited: a few at a time per
source, a share of the pool in total, and a short wait for the key. A hello beyond those
bounds waits briefly for a slot if only a few others wait (a legitimate client's first burst
of connections, before it has announced any stream, is several hellos from one source at
once); the rest are refused at once, without a KME call. Work for streams we opened, or that
an authenticated peer announced, is not limited here.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from qkdproxy.core.keys import KeySourceUnavailableError, PeerNotConnectedError
from qkdproxy.keys.sources import StreamKeySource

T = TypeVar("T")
# The source (ratelimit.source_key) of the unauthenticated hello being served, if any.
HELLO_SOURCE: ContextVar[str | None] = ContextVar("qkdproxy_hello_source", default=None)


class _Closable(StreamKeySource, Protocol):
    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class ResponderLimits:
    """Bounds on KME work for KSIDs named in unauthenticated hellos."""

    per_source: int = 2
    total: int = 4
    key_wait_s: float = 0.5
    # How long a hello beyond the bounds may wait for a slot; at most ``per_source`` such
    # hellos wait per source and ``total`` overall. Waiting holds no KME connection.
    slot_wait_s: float = 1.0


@dataclass(slots=True)
class GuardedStreams:
    """A StreamKeySource (the KME connection pool) with :class:`ResponderLimits` applied to
    peer-supplied KSIDs while a hello is being served. Counts what it refused."""

    inner: _Closable
    limits: ResponderLimits = field(default_factory=ResponderLimits)
    refused: int = 0
    timed_out: int = 0
    _busy: dict[str, int] = field(default_factory=dict)
    _total: int = 0
    _waiting: dict[str, int] = field(default_factory=dict)
    _waiting_total: int = 0
    # Set (and replaced) whenever a slot is given back: wakes the hellos waiting for one.
    _released: asyncio.Event = field(default_factory=asyncio.Event)

    async def open(self, ksid: bytes | None) -> bytes:
        """OPEN_CONNECT; bounded when ``ksid`` came in a hello."""
        if ksid is None:
            return await self.inner.open(None)
        return await self._bounded(self.inner.open(ksid), None)

    async def get_key(self, ksid: bytes, index: int) -> bytes:
        """GET_KEY; bounded, with a short wait, when serving a hello."""
        return await self._bounded(self.inner.get_key(ksid, index), self.limits.key_wait_s)

    async def close(self, ksid: bytes) -> None:
        """CLOSE (never bounded: it frees KME resources)."""
        await self.inner.close(ksid)

    async def aclose(self) -> None:
        """Close the pool."""
        await self.inner.aclose()

    async def _bounded(self, call: Awaitable[T], wait_s: float | None) -> T:
        source = HELLO_SOURCE.get()
        if source is None:
            return await call
        async with self._slot(source, call):
            try:
                async with asyncio.timeout(wait_s):
                    return await call
            except TimeoutError:
                # The stream's other end never showed up: likely a KSID made up by the
                # client. (The pooled connection is dropped: its answer may still come.)
                self.timed_out += 1
                raise PeerNotConnectedError(
                    f"no key for this stream within {wait_s} s (unknown to the KME?)"
                ) from None

    @contextlib.asynccontextmanager
    async def _slot(self, source: str, call: Awaitable[object]) -> AsyncIterator[None]:
        if self._full(source) and not await self._waited_for_slot(source):
            self.refused += 1
            if asyncio.iscoroutine(call):
                call.close()  # never started: no KME call is made
            raise KeySourceUnavailableError("ETSI 004: too many streams opened for hellos")
        self._busy[source] = self._busy.get(source, 0) + 1
        self._total += 1
        try:
            yield
        finally:
            self._total -= 1
            _decrement(self._busy, source)
            self._released.set()
            self._released = asyncio.Event()

    def _full(self, source: str) -> bool:
        return (
            self._busy.get(source, 0) >= self.limits.per_source or self._total >= self.limits.total
        )

    async def _waited_for_slot(self, source: str) -> bool:
        """Wait up to ``slot_wait_s`` for a slot, if few enough others wait; True once one
        is free (not taken yet: the caller takes it before it yields to the loop)."""
        limits = self.limits
        if self._waiting.get(source, 0) >= limits.per_source or (
            self._waiting_total >= limits.total
        ):
            return False
        self._waiting[source] = self._waiting.get(source, 0) + 1
        self._waiting_total += 1
        try:
            async with asyncio.timeout(limits.slot_wait_s):
                while self._full(source):
                    await self._released.wait()
            return True
        except TimeoutError:
            return False
        finally:
            self._waiting_total -= 1
            _decrement(self._waiting, source)


def _decrement(counts: dict[str, int], source: str) -> None:
    if (left := counts[source] - 1) > 0:
        counts[source] = left
    else:
        del counts[source]
