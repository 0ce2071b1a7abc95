"""qkdproxy.io.aio's loop-holding waits against asyncio's own, case by case, on the
Python running the tests: each scenario runs once under :func:`asyncio.timeout_at` and
once under :class:`aio.Deadline`, and what the block and the task saw must be the same
(what that is may differ between Python versions; a difference between the two is not
allowed). Expiries, outside cancellations in the same loop round, nesting, many expiries
on one task; then :func:`aio.sleep`'s timer."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import pytest

from qkdproxy.io import aio

Scope = Callable[[float | None], contextlib.AbstractAsyncContextManager[Any]]
KINDS = ("asyncio", "aio")


def scope_for(kind: str) -> Scope:
    """A deadline at a loop time: asyncio's timeout_at or the loop-holding Deadline."""
    if kind == "asyncio":
        return asyncio.timeout_at
    loop = asyncio.get_running_loop()
    return lambda when: aio.deadline(loop, when)


async def outcome(body: Awaitable[object]) -> tuple[str, ...]:
    """What ``body`` ended with, then what the task's next wait saw (a cancellation left
    behind shows there) and the task's count of cancellations still requested."""
    task = asyncio.current_task()
    assert task is not None
    seen: list[str] = []
    try:
        seen.append(f"returned {await body!r}")
    except BaseException as exc:
        seen.append(f"raised {type(exc).__name__}")
    try:
        await asyncio.sleep(0)
        seen.append("next wait: ran")
    except asyncio.CancelledError:
        seen.append("next wait: cancelled")
    seen.append(f"cancelling {task.cancelling()}")
    return tuple(seen)


async def in_task(
    scenario: Callable[[Scope], Coroutine[Any, Any, tuple[str, ...]]], kind: str
) -> Any:
    """Run ``scenario`` in a task of its own (cancellation counts start at zero)."""
    return await asyncio.get_running_loop().create_task(scenario(scope_for(kind)))


async def both(
    scenario: Callable[[Scope], Coroutine[Any, Any, tuple[str, ...]]],
) -> tuple[str, ...]:
    """``scenario``'s outcome, which must be asyncio's and the Deadline's alike."""
    theirs = await in_task(scenario, "asyncio")
    ours = await in_task(scenario, "aio")
    assert ours == theirs
    return tuple(ours)


async def test_expiry_raises_timeout_and_leaves_nothing_behind() -> None:
    async def scenario(scope: Scope) -> tuple[str, ...]:
        loop = asyncio.get_running_loop()

        async def body() -> None:
            async with scope(loop.time() - 1):
                await loop.create_future()

        return await outcome(body())

    assert await both(scenario) == ("raised TimeoutError", "next wait: ran", "cancelling 0")


@pytest.mark.parametrize("order", ["outside first", "expiry first"])
async def test_an_outside_cancellation_in_the_expiry_round_passes_through(order: str) -> None:
    """The deadline and a stop of the whole task fire in one round of the loop, in either
    order: the stop is not turned into a timeout, nor swallowed."""

    async def scenario(scope: Scope) -> tuple[str, ...]:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        when = loop.time() + 0.01

        async def body() -> None:
            if order == "outside first":
                loop.call_at(when, task.cancel)
            async with scope(when):
                if order == "expiry first":
                    loop.call_at(when, task.cancel)
                await loop.create_future()

        return await outcome(body())

    assert (await both(scenario))[0] == "raised CancelledError"


async def test_an_outside_cancellation_before_the_expiry_passes_through() -> None:
    async def scenario(scope: Scope) -> tuple[str, ...]:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None

        async def body() -> None:
            async with scope(loop.time() + 60):
                loop.call_soon(task.cancel)
                await loop.create_future()

        return await outcome(body())

    assert (await both(scenario))[:2] == ("raised CancelledError", "next wait: ran")


async def test_an_outside_cancellation_during_the_blocks_cleanup_after_expiry() -> None:
    """Expired; the block's cleanup waits and the task is stopped meanwhile: the stop wins
    (a daemon stopping must not see a timeout it would retry)."""

    async def scenario(scope: Scope) -> tuple[str, ...]:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None

        async def body() -> None:
            async with scope(loop.time() - 1):
                try:
                    await loop.create_future()
                finally:
                    loop.call_soon(task.cancel)
                    await loop.create_future()

        return await outcome(body())

    assert (await both(scenario))[0] == "raised CancelledError"


async def test_an_outside_cancellation_after_the_timeout_reaches_the_next_wait() -> None:
    async def scenario(scope: Scope) -> tuple[str, ...]:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None

        async def body() -> None:
            try:
                async with scope(loop.time() - 1):
                    await loop.create_future()
            finally:
                task.cancel()

        return await outcome(body())

    assert await both(scenario) == ("raised TimeoutError", "next wait: cancelled", "cancelling 1")


@pytest.mark.parametrize("swallow", [False, True])
async def test_a_block_done_in_the_round_its_deadline_fires(swallow: bool) -> None:
    """What the block waited for arrives in the round the deadline passes: whichever wins,
    no cancellation is left for the task's next wait (or, if one is, asyncio's timeout
    leaves it too). ``swallow``: the block takes the cancellation as an end of its own."""

    async def scenario(scope: Scope) -> tuple[str, ...]:
        loop = asyncio.get_running_loop()
        when = loop.time() + 0.01
        arrives: asyncio.Future[str] = loop.create_future()
        loop.call_at(when, arrives.set_result, "arrived")

        async def body() -> str:
            async with scope(when):
                try:
                    return await arrives
                except asyncio.CancelledError:
                    if not swallow:
                        raise
                    return "swallowed"

        return await outcome(body())

    assert (await both(scenario))[1:] == ("next wait: ran", "cancelling 0")


async def test_nested_deadlines_each_take_only_their_own_expiry() -> None:
    async def scenario(scope: Scope) -> tuple[str, ...]:
        loop = asyncio.get_running_loop()
        inner_first: list[str] = []

        async def body() -> str:
            async with scope(loop.time() + 60):
                try:
                    async with scope(loop.time() - 1):
                        await loop.create_future()
                except TimeoutError:
                    inner_first.append("inner timed out")
                # The outer one passes inside a fresh inner one with time to spare.
                async with scope(loop.time() - 1) as outer_now, scope(loop.time() + 60):
                    await loop.create_future()
                return repr(outer_now)

        ended = await outcome(body())
        return (*inner_first, *ended)

    assert await both(scenario) == (
        "inner timed out",
        "raised TimeoutError",
        "next wait: ran",
        "cancelling 0",
    )


async def test_the_outer_deadline_passing_inside_an_inner_one_is_the_outers() -> None:
    async def scenario(scope: Scope) -> tuple[str, ...]:
        loop = asyncio.get_running_loop()
        caught: list[str] = []

        async def body() -> None:
            try:
                async with scope(loop.time() - 1):
                    try:
                        async with scope(loop.time() + 60):
                            await loop.create_future()
                    except BaseException as exc:
                        caught.append(f"inner let {type(exc).__name__} through")
                        raise
            except TimeoutError:
                caught.append("outer timed out")
                raise

        return (*(await outcome(body())), *caught)

    assert await both(scenario) == (
        "raised TimeoutError",
        "next wait: ran",
        "cancelling 0",
        "inner let CancelledError through",
        "outer timed out",
    )


async def test_nested_deadlines_passing_in_one_round_are_the_outers() -> None:
    """The hello deadline (outer) and the handshake's own (inner) pass in the same round:
    the inner one lets the outer's cancellation through, the outer takes it as its timeout
    (the client is refused for its slow hello, not stopped)."""

    async def scenario(scope: Scope) -> tuple[str, ...]:
        loop = asyncio.get_running_loop()
        when = loop.time() + 0.01
        inner: list[str] = []

        async def body() -> None:
            async with scope(when):
                try:
                    async with scope(when):
                        await loop.create_future()
                except BaseException as exc:
                    inner.append(type(exc).__name__)
                    raise

        ended = await outcome(body())
        return (*inner, *ended)

    assert (await both(scenario))[1:] == ("raised TimeoutError", "next wait: ran", "cancelling 0")


async def test_a_deadline_moved_earlier_or_later_fires_at_its_last_time() -> None:
    async def scenario(scope: Scope) -> tuple[str, ...]:
        loop = asyncio.get_running_loop()
        arrives: asyncio.Future[str] = loop.create_future()

        async def body() -> str:
            async with scope(None) as cm:
                cm.reschedule(loop.time() + 60)
                cm.reschedule(None)
                loop.call_soon(arrives.set_result, "arrived")
                got = await arrives
                cm.reschedule(loop.time() - 1)
                await loop.create_future()
                return got

        return await outcome(body())

    assert (await both(scenario))[0] == "raised TimeoutError"


async def test_many_expiries_on_one_task_keep_its_cancellation_count() -> None:
    """A long-lived task (a mux tunnel's, a connection's repeated waits) times out over and
    over: its count of cancellations must not creep, or a later timeout would pass for a
    stop from outside (a CancelledError where a TimeoutError was due)."""

    async def scenario(scope: Scope) -> tuple[str, ...]:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        timeouts = 0
        for _ in range(500):
            with contextlib.suppress(TimeoutError):
                async with scope(loop.time() - 1):
                    await loop.create_future()
            timeouts += 1
            assert task.cancelling() == 0

        async def body() -> None:
            async with scope(loop.time() - 1):
                await loop.create_future()

        return (str(timeouts), *(await outcome(body())))

    assert await both(scenario) == ("500", "raised TimeoutError", "next wait: ran", "cancelling 0")


async def test_a_deadline_in_the_cleanup_of_a_cancelled_task() -> None:
    """A cleanup bounded by a deadline, in a task already told to stop (a connection's
    close during shutdown): the expiry is a timeout, the stop is still requested."""

    async def scenario(scope: Scope) -> tuple[str, ...]:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop.create_future()

        async def body() -> None:
            async with scope(loop.time() - 1):
                await loop.create_future()

        return await outcome(body())

    assert (await both(scenario))[0] == "raised TimeoutError"


async def test_sleep_cancelled_before_its_timer_leaves_no_timer_to_fire() -> None:
    loop = asyncio.get_running_loop()
    sleeping = loop.create_task(aio.sleep(loop, 60))
    await asyncio.sleep(0)
    sleeping.cancel()
    with pytest.raises(asyncio.CancelledError):
        await sleeping
    assert not [h for h in loop._scheduled if not h.cancelled()]  # type: ignore[attr-defined]
