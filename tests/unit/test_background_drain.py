"""Waiting for background key work ends once the work has: a finished task still named by
its set (its removal callback not yet run) must not keep the wait going. From Python 3.12
gathering finished tasks no longer yields to the event loop, so a wait that looped on the
set alone spun forever (ETSI 004's CLOSE after a handshake hung there on 3.12 and 3.13)."""

from __future__ import annotations

import asyncio

from qkdproxy.keys.context import KeyContext
from qkdproxy.keys.etsi004_supply import PrefetchingStreams
from qkdproxy.keys.sources import KeySources
from qkdproxy.sim.inprocess import InProcessQkdLink

STEP_S = 5.0


async def _finished_task() -> asyncio.Task[None]:
    task = asyncio.ensure_future(asyncio.sleep(0))
    await task
    return task


async def test_key_context_drain_ends_with_a_finished_task_still_in_its_set() -> None:
    context = KeyContext(KeySources())
    context.background.add(await _finished_task())  # its discard callback never comes
    await asyncio.wait_for(context.drain(), STEP_S)


async def test_key_context_drain_still_waits_for_running_work() -> None:
    context = KeyContext(KeySources())
    release = asyncio.Event()

    async def work() -> None:
        await release.wait()

    running = asyncio.ensure_future(work())
    context.background.add(running)
    drained = asyncio.ensure_future(context.drain())
    await asyncio.sleep(0)
    assert not drained.done()
    release.set()
    await asyncio.wait_for(drained, STEP_S)
    assert running.done()


async def test_etsi004_prefetch_wait_idle_ends_with_a_finished_task_still_listed() -> None:
    streams = InProcessQkdLink().sources("a").stream
    assert streams is not None
    supply = PrefetchingStreams(streams)
    supply._tasks[b"k" * 16] = await _finished_task()
    await asyncio.wait_for(supply.wait_idle(), STEP_S)
