"""The event loop a key source schedules its work on, looked up once."""

from __future__ import annotations

import asyncio


class HeldLoop:
    """The running event loop, looked up on first use and held after.

    Python 3.11 makes a getpid() system call in each ``asyncio.get_running_loop()`` (and so
    in each ``asyncio.create_task`` and ``ensure_future`` of a coroutine), and a key source
    schedules work for nearly every connection. A key source serves one loop (its tasks and
    its KME client's session are bound to it); a closed loop is let go, so a source used
    again under a new loop (as tests do) holds that one.
    """

    __slots__ = ("_loop",)

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None

    def get(self) -> asyncio.AbstractEventLoop:
        """The loop; the first call (and the first after the loop closed) must run on it."""
        loop = self._loop
        if loop is None or loop.is_closed():
            loop = self._loop = asyncio.get_running_loop()
        return loop
