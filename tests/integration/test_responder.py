"""ETSI 004 responder side: KSIDs named in unauthenticated hellos cannot tie up the KME
connection pool (a fake pool for the rules, the KME simulator for the real thing)."""

from __future__ import annotations

import asyncio
import contextvars
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import pytest

from qkdproxy.core.keys import KeySourceUnavailableError, PeerNotConnectedError, QkdKeyError
from qkdproxy.keys.etsi004_client import Etsi004ClientPool
from qkdproxy.keys.responder import HELLO_SOURCE, GuardedStreams, ResponderLimits
from qkdproxy.sim.pki import CertificateAuthority
from tests.integration.test_etsi004 import Kmes, running_kmes

T = TypeVar("T")


class StallingPool:
    """A pool whose GET_KEY for a KSID nobody opened waits until released."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.most = 0
        self.calls = 0
        self.release = asyncio.Event()

    async def _call(self, answer: bytes, stall: bool) -> bytes:
        self.calls += 1
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            if stall:
                await self.release.wait()
            return answer
        finally:
            self.in_flight -= 1

    async def open(self, ksid: bytes | None) -> bytes:
        return await self._call(ksid or b"k" * 16, stall=False)

    async def get_key(self, ksid: bytes, index: int) -> bytes:
        return await self._call(b"\x00" * 32, stall=ksid.startswith(b"bogus"))

    async def close(self, ksid: bytes) -> None:
        await self._call(b"", stall=False)

    async def aclose(self) -> None:
        self.release.set()


def as_hello_from(source: str | None, work: Callable[[], Awaitable[T]]) -> asyncio.Task[T]:
    """Run ``work`` in a task serving a hello from ``source`` (None: not a hello)."""
    context = contextvars.copy_context()
    context.run(HELLO_SOURCE.set, source)

    async def run() -> T:
        return await work()

    return asyncio.get_running_loop().create_task(run(), context=context)


def bogus(guarded: GuardedStreams, i: int) -> Callable[[], Awaitable[bytes]]:
    return lambda: guarded.get_key(b"bogus%02d" % i, 0)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_one_source_gets_at_most_its_share_two_wait_and_the_rest_fail_at_once() -> None:
    pool = StallingPool()
    guarded = GuardedStreams(pool, ResponderLimits(per_source=2, total=4, key_wait_s=60))
    attack = [as_hello_from("192.0.2.66", bogus(guarded, i)) for i in range(32)]
    await settle()
    assert pool.in_flight == 2 and guarded.refused == 28
    refused = [t for t in attack if t.done()]
    assert len(refused) == 28
    assert all(isinstance(t.exception(), KeySourceUnavailableError) for t in refused)
    # Another source still gets its share, and our own streams are not bounded at all.
    other = as_hello_from("198.51.100.7", lambda: guarded.get_key(b"bogus-b", 0))
    own = as_hello_from(None, lambda: guarded.get_key(b"ours", 0))
    assert len(await own) == 32
    await settle()
    assert pool.in_flight == 3 and not other.done()
    pool.release.set()
    await asyncio.gather(*attack, other, return_exceptions=True)
    assert pool.calls == 2 + 2 + 1 + 1  # the refused 28 never reached the KME


async def test_the_total_share_holds_across_many_sources() -> None:
    pool = StallingPool()
    guarded = GuardedStreams(pool, ResponderLimits(per_source=2, total=4, key_wait_s=60))
    tasks = [as_hello_from(f"203.0.113.{i}", bogus(guarded, i)) for i in range(20)]
    await settle()
    assert pool.most == 4 and guarded.refused == 12  # and 4 wait
    pool.release.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert pool.most == 4 and pool.calls == 8


async def test_a_first_burst_from_one_client_waits_for_slots_instead_of_failing() -> None:
    """A client's first connections come before it has announced any stream: four hellos
    from one source at once, with two slots per source. Two go, two wait (holding no KME
    connection) and go as slots come back; none fails."""
    pool = StallingPool()
    guarded = GuardedStreams(pool, ResponderLimits(per_source=2, total=4, key_wait_s=60))
    burst = [as_hello_from("192.0.2.8", bogus(guarded, i)) for i in range(4)]
    await settle()
    assert pool.in_flight == 2 and guarded.refused == 0 and not any(t.done() for t in burst)
    pool.release.set()
    assert [len(k) for k in await asyncio.gather(*burst)] == [32] * 4
    assert pool.most == 2 and guarded.refused == 0


async def test_an_unknown_ksid_waits_only_briefly() -> None:
    pool = StallingPool()
    guarded = GuardedStreams(pool, ResponderLimits(key_wait_s=0.05))
    task = as_hello_from("192.0.2.1", lambda: guarded.get_key(b"bogus", 0))
    with pytest.raises(PeerNotConnectedError):
        await asyncio.wait_for(task, 5)
    assert guarded.timed_out == 1 and pool.in_flight == 0
    # The slot was given back: the same source may try again.
    again = as_hello_from("192.0.2.1", lambda: guarded.get_key(b"fine", 0))
    assert len(await again) == 32


async def test_open_for_a_peer_ksid_is_bounded_but_our_own_opens_are_not() -> None:
    pool = StallingPool()
    guarded = GuardedStreams(pool, ResponderLimits(per_source=1, total=1, slot_wait_s=0.05))
    stuck = as_hello_from("192.0.2.1", lambda: guarded.get_key(b"bogus", 0))
    await settle()
    with pytest.raises(KeySourceUnavailableError):  # after waiting for a slot that stays taken
        await as_hello_from("192.0.2.2", lambda: guarded.open(b"peer-ksid"))
    assert pool.calls == 1
    assert await as_hello_from("192.0.2.2", lambda: guarded.open(None)) == b"k" * 16
    await guarded.aclose()
    await stuck


# --------------------------------------------------------------- against the simulator


@pytest.fixture
async def kmes(ca: CertificateAuthority) -> AsyncIterator[Kmes]:
    async with running_kmes(ca) as running:
        yield running


async def test_random_ksids_in_hellos_do_not_slow_the_pool_down(kmes: Kmes) -> None:
    """32 hellos naming made-up KSIDs, all from one source, against a pool of 8 real KME
    connections: two reach the KME and give up after the short wait, the others are refused
    without a KME call, and a legitimate stream opened and keyed meanwhile is not queued."""
    pool = Etsi004ClientPool(lambda: kmes.client("bob", "alice", via="b"), size=8)
    # A 1 s key wait: the legitimate hello must be keyed within it too, and a loaded machine
    # took longer than 0.3 s (the bogus hellos' waits it bounds are not what is measured).
    guarded = GuardedStreams(pool, ResponderLimits(per_source=2, total=4, key_wait_s=1.0))
    alice = kmes.client("alice", "bob", via="a")

    async def bogus_hello() -> bytes:
        ksid = await guarded.open(os.urandom(16))
        return await guarded.get_key(ksid, 0)

    attack = [as_hello_from("192.0.2.66", bogus_hello) for _ in range(32)]
    await settle()
    ksid = await alice.open(None)

    async def legit_hello() -> bytes:
        assert await guarded.open(ksid) == ksid
        return await guarded.get_key(ksid, 0)

    legit = await asyncio.wait_for(as_hello_from("198.51.100.7", legit_hello), 5)
    assert legit == await alice.get_key(ksid, 0)
    outcomes = await asyncio.gather(*attack, return_exceptions=True)
    assert all(isinstance(o, QkdKeyError) for o in outcomes)
    assert guarded.refused >= 28 and guarded.timed_out <= 4
    await pool.aclose()
