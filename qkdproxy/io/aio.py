"""Event-loop selection: uvloop when it is installed, asyncio's own loop otherwise."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on the fastest available event loop."""
    try:
        import uvloop  # noqa: PLC0415 - optional accelerator
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def loop_name() -> str:
    """Which event loop implementation is running."""
    return type(asyncio.get_running_loop()).__module__.split(".")[0]


# Python 3.11's asyncio looks the running loop up in C, with a getpid() system call each
# time, in every asyncio.sleep, asyncio.wait and asyncio.create_task. A connection's code
# that holds its loop already uses these instead (3.12 dropped the check; the saving in
# Python calls remains).


async def sleep(loop: asyncio.AbstractEventLoop, delay: float) -> None:
    """:func:`asyncio.sleep` on ``loop``, which the caller holds."""
    waiter: asyncio.Future[None] = loop.create_future()
    timer = loop.call_later(delay, _wake, waiter)
    try:
        await waiter
    finally:
        timer.cancel()


async def first_done(
    loop: asyncio.AbstractEventLoop, tasks: set[asyncio.Task[T]], wait_s: float | None
) -> set[asyncio.Task[T]]:
    """:func:`asyncio.wait` with ``FIRST_COMPLETED`` on ``loop``: the tasks of ``tasks``
    that are done, once one is or ``wait_s`` seconds passed (None: no limit; then maybe
    none is)."""
    done = {task for task in tasks if task.done()}
    if done:
        return done
    waiter: asyncio.Future[None] = loop.create_future()

    def wake(_: object) -> None:
        _wake(waiter)

    for task in tasks:
        task.add_done_callback(wake)
    timer = loop.call_later(wait_s, _wake, waiter) if wait_s is not None else None
    try:
        await waiter
    finally:
        if timer is not None:
            timer.cancel()
        for task in tasks:
            task.remove_done_callback(wake)
    return {task for task in tasks if task.done()}


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
