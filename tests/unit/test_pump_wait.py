"""The pump's wait for its two directions (callbacks, not a wait per direction), and the
loop-holding helpers the connection path uses instead of asyncio's (aio.cancel_all,
aio.open_connection)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from qkdproxy.daemon.pump import Traffic, _until_done
from qkdproxy.io import aio


def callbacks(task: asyncio.Task[Any]) -> int:
    """How many done callbacks ``task`` holds (CPython's Task exposes them)."""
    return len(task._callbacks or ())


def pending_timers(loop: asyncio.AbstractEventLoop) -> int:
    return len([h for h in loop._scheduled if not h.cancelled()])  # type: ignore[attr-defined]


async def _wait_for(release: asyncio.Future[None]) -> None:
    await release


async def _fail() -> None:
    raise ConnectionResetError("reset by peer")


async def test_both_directions_ending_is_closed_and_leaves_nothing_behind() -> None:
    loop = asyncio.get_running_loop()
    release: asyncio.Future[None] = loop.create_future()
    tasks = {loop.create_task(_wait_for(release)) for _ in range(2)}
    await asyncio.sleep(0)
    before = {task: callbacks(task) for task in tasks}
    timers = pending_timers(loop)
    waiting = loop.create_task(_until_done(loop, tasks, Traffic(), 60))
    await asyncio.sleep(0)
    assert {task: callbacks(task) for task in tasks} == {t: n + 1 for t, n in before.items()}
    release.set_result(None)
    assert await waiting == "closed"
    assert pending_timers(loop) == timers


async def test_one_direction_failing_ends_the_wait_with_its_error() -> None:
    loop = asyncio.get_running_loop()
    release: asyncio.Future[None] = loop.create_future()
    running = loop.create_task(_wait_for(release))
    tasks = {running, loop.create_task(_fail())}
    reason = await _until_done(loop, tasks, Traffic(), 0)
    assert reason == "error: ConnectionResetError: reset by peer"
    assert not running.done() and callbacks(running) == 0
    await aio.cancel_all(tasks)
    assert running.cancelled()


async def test_the_idle_limit_counts_from_the_last_activity() -> None:
    loop = asyncio.get_running_loop()
    release: asyncio.Future[None] = loop.create_future()
    tasks = {loop.create_task(_wait_for(release))}
    traffic = Traffic()
    waiting = loop.create_task(_until_done(loop, tasks, traffic, 0.05))
    idle_for: list[float] = []
    waiting.add_done_callback(lambda _: idle_for.append(time.monotonic() - traffic.last_activity))
    for _ in range(4):  # activity within the limit (unless the machine stalls us)
        await asyncio.sleep(0.02)
        if waiting.done():
            break
        traffic.last_activity = time.monotonic()
    assert await waiting == "idle_timeout"
    assert idle_for[0] >= 0.05  # never before the limit, counted from the last activity
    assert callbacks(next(iter(tasks))) == 0
    await aio.cancel_all(tasks)


async def test_cancelling_the_wait_leaves_the_tasks_running_and_unwatched() -> None:
    loop = asyncio.get_running_loop()
    release: asyncio.Future[None] = loop.create_future()
    watched = loop.create_task(_wait_for(release))
    await asyncio.sleep(0)
    before = callbacks(watched)
    timers = pending_timers(loop)
    waiting = loop.create_task(_until_done(loop, {watched}, Traffic(), 60))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert not watched.done() and callbacks(watched) == before
    assert pending_timers(loop) == timers
    release.set_result(None)
    await watched


async def test_cancel_all_settles_done_tasks_without_waiting_and_waits_for_the_rest() -> None:
    loop = asyncio.get_running_loop()
    failed = loop.create_task(_fail())
    finished = loop.create_task(asyncio.sleep(0))
    await asyncio.sleep(0.01)
    assert failed.done() and finished.done()
    await aio.cancel_all({failed, finished})  # no error raised: it is retrieved
    assert failed._log_traceback is False
    release: asyncio.Future[None] = loop.create_future()
    running = loop.create_task(_wait_for(release))
    await aio.cancel_all({running})
    assert running.cancelled()


async def test_open_connection_on_a_held_loop_is_a_stream_pair() -> None:
    loop = asyncio.get_running_loop()

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.read(10))
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        reader, writer = await aio.open_connection(loop, "127.0.0.1", port)
        writer.write(b"ping")
        assert await reader.read() == b"ping"
        writer.close()
        await writer.wait_closed()
