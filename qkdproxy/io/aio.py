"""Event-loop selection (uvloop when it is installed, asyncio's own loop otherwise), and
asyncio's waits for callers that hold their loop."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterable
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


async def cancel_all(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and wait until they ended (``asyncio.gather`` with
    ``return_exceptions``). Those done already (a connection's, as a rule) are settled
    here, their exceptions retrieved, with no gathering future, no callbacks and no round
    of the loop to wait for."""
    pending = []
    for task in tasks:
        if not task.done():
            task.cancel()
            pending.append(task)
        elif not task.cancelled():
            task.exception()  # retrieved: no "never retrieved" report when it is collected
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)


async def open_connection(
    loop: asyncio.AbstractEventLoop, host: str, port: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """:func:`asyncio.open_connection` on ``loop``, which the caller holds."""
    reader = asyncio.StreamReader(loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport, _ = await loop.create_connection(lambda: protocol, host, port)
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class Deadline:
    """:func:`asyncio.timeout_at` for a task and loop the caller holds (the task given as
    ``asyncio.current_task(loop)``, which looks nothing up): the block is cancelled at
    ``when`` (loop time; None: never) and raises :class:`TimeoutError` then. A cancellation
    from elsewhere passes through as it is, also when it comes together with the expiry.
    """

    __slots__ = ("_cancelling", "_expired", "_handle", "_loop", "_task", "_when")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, task: asyncio.Task[Any], when: float | None
    ) -> None:
        self._loop = loop
        self._task = task
        self._when = when
        self._handle: asyncio.TimerHandle | None = None
        self._expired = False
        self._cancelling = 0

    def expired(self) -> bool:
        """Whether the deadline passed (the block was cancelled for it)."""
        return self._expired

    def reschedule(self, when: float | None) -> None:
        """Move the deadline (None: none), unless it passed already."""
        if self._expired:
            return
        self._when = when
        if self._handle is not None:
            self._handle.cancel()
        self._handle = None if when is None else self._loop.call_at(when, self._expire)

    async def __aenter__(self) -> Deadline:
        # Cancellations already requested are not ours to turn into a timeout.
        self._cancelling = self._task.cancelling()
        self.reschedule(self._when)
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: object, tb: object) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._expired:
            # Our cancellation is taken back whatever the block raised; only when no other
            # was requested meanwhile is the cancellation ours to turn into a timeout.
            ours = self._task.uncancel() <= self._cancelling
            if ours and kind is asyncio.CancelledError:
                raise TimeoutError

    def _expire(self) -> None:
        self._handle = None
        self._expired = True
        self._task.cancel()


def deadline(loop: asyncio.AbstractEventLoop, when: float | None) -> Deadline:
    """A :class:`Deadline` at ``when`` for the task running on ``loop``."""
    task = asyncio.current_task(loop)
    if task is None:
        raise RuntimeError("a deadline applies to a task")
    return Deadline(loop, task, when)
