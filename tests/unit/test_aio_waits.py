"""The loop-holding waits of qkdproxy.io.aio behave as asyncio's own."""

from __future__ import annotations

import asyncio

import pytest

from qkdproxy.io import aio


async def test_a_deadline_that_passes_raises_timeout() -> None:
    loop = asyncio.get_running_loop()
    never: asyncio.Future[None] = loop.create_future()
    deadline = aio.deadline(loop, loop.time() + 0.01)
    with pytest.raises(TimeoutError):
        async with deadline:
            await never
    assert deadline.expired()
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0


async def test_a_deadline_moved_away_does_not_fire() -> None:
    loop = asyncio.get_running_loop()
    async with aio.deadline(loop, loop.time() + 0.01) as deadline:
        deadline.reschedule(None)
        await aio.sleep(loop, 0.03)
    assert not deadline.expired()


async def test_a_cancellation_from_elsewhere_passes_through() -> None:
    loop = asyncio.get_running_loop()
    entered = asyncio.Event()

    async def guarded() -> None:
        async with aio.deadline(loop, loop.time() + 60):
            entered.set()
            await loop.create_future()

    task = loop.create_task(guarded())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
