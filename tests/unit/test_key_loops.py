"""Key sources hold their event loop (no look-up per connection) and let a closed one go."""

from __future__ import annotations

import asyncio

import pytest

from qkdproxy.keys.announce import AnnouncedSlave
from qkdproxy.keys.loops import HeldLoop
from qkdproxy.sim.inprocess import InProcessQkdLink


def test_held_loop_is_the_running_loop_until_it_closes() -> None:
    held = HeldLoop()

    async def look() -> tuple[asyncio.AbstractEventLoop, asyncio.AbstractEventLoop]:
        await asyncio.sleep(0)
        return held.get(), asyncio.get_running_loop()

    first = asyncio.run(look())
    assert first[0] is first[1]
    second = asyncio.run(look())  # the first loop closed: the new one is held
    assert second[0] is second[1] is not first[1]


def test_held_loop_is_looked_up_on_a_running_loop() -> None:
    with pytest.raises(RuntimeError):
        HeldLoop().get()


def test_an_announced_slave_serves_a_second_loop_after_the_first_closed() -> None:
    link = InProcessQkdLink()
    a, b = link.sources("a"), link.sources("b")
    assert a.master and b.slave
    slave = AnnouncedSlave(b.slave)

    async def round_trip() -> None:
        assert a.master
        key = await a.master.take_key()
        slave.announced([key.key_id])
        await asyncio.wait_for(slave.wait_fetched(), 5)
        assert (await slave.get_key(key.key_id)).material == key.material

    asyncio.run(round_trip())
    asyncio.run(round_trip())
    assert slave.counters.served_from_cache == 2
