"""The asyncio side of admission control: listeners whose readers watch the hello arrive,
the hello deadlines, and refusals that cost no more than a reset.

The decisions live in :mod:`qkdproxy.core.admission`; this module only measures time and
bytes on real sockets, and never touches the TLS code: the deadlines wrap the handshake.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, SupportsIndex, TypeVar

from qkdproxy.core.admission import HelloProgress, HelloState, Refusal
from qkdproxy.io import aio, sendq
from qkdproxy.io.socket_reader import SocketReader, accepting

T = TypeVar("T")
Handler = Callable[
    [asyncio.StreamReader | SocketReader, asyncio.StreamWriter], Coroutine[object, object, None]
]


class WatchedReader(asyncio.StreamReader):
    """A stream reader that also follows the first TLS handshake message as it arrives."""

    def __init__(self, limit: int = 2**16, loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(limit=limit, loop=loop)
        self.hello = HelloProgress()
        self.on_progress: Callable[[HelloState], None] | None = None

    def feed_data(self, data: Iterable[SupportsIndex]) -> None:
        """Pass ``data`` on, noting the hello's progress first."""
        if self.hello.state is not HelloState.COMPLETE:
            before = self.hello.state
            after = self.hello.feed(bytes(data))
            if after is not before and self.on_progress is not None:
                self.on_progress(after)
        super().feed_data(data)


def _factory(
    handler: Handler, read_size: int | None, loop: asyncio.AbstractEventLoop
) -> Callable[[], asyncio.BaseProtocol]:
    if read_size is not None:
        # Plaintext: read in place by the pumps from the start.
        return accepting(handler, read_size, loop)

    def protocol() -> asyncio.StreamReaderProtocol:
        # The loop passed in: the reader and the protocol would each look it up otherwise,
        # for every connection (a getpid() each on Python 3.11).
        return asyncio.StreamReaderProtocol(WatchedReader(loop=loop), handler, loop=loop)

    return protocol


async def start_server(
    handler: Handler, *, plaintext_read_size: int | None = None, **kwargs: Any
) -> asyncio.Server:
    """:func:`asyncio.start_server`, with :class:`WatchedReader` readers; with
    ``plaintext_read_size`` a plaintext listener (no hello to watch), each connection read
    by a :class:`SocketReader` of that size. Accepted TCP connections
    have SO_KEEPALIVE: set once on the listening sockets, which Linux copies to every
    connection they accept (no system call per connection), or per connection on a
    ``sock`` passed in."""
    loop = asyncio.get_running_loop()
    if "sock" in kwargs:
        # A socket passed in (systemd's) may be listening already: connections queued
        # before the option was set lack it, so each one gets it when accepted.
        handler = _keeping_alive(handler)
    serve = kwargs.pop("start_serving", True)
    # Not listening yet: no connection can be accepted before the option is set.
    server = await loop.create_server(
        _factory(handler, plaintext_read_size, loop), start_serving=False, **kwargs
    )
    for sock in server.sockets:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if serve:
        await server.start_serving()
    return server


def _keeping_alive(handler: Handler) -> Handler:
    async def each(
        reader: asyncio.StreamReader | SocketReader, writer: asyncio.StreamWriter
    ) -> None:
        keep_alive(writer)
        await handler(reader, writer)

    return each


def keep_alive(writer: asyncio.StreamWriter) -> None:
    """SO_KEEPALIVE on a TCP connection (a dead peer is found even while nothing is sent)."""
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        _keep_alive(sock)


def keep_dialled_alive(writer: asyncio.StreamWriter) -> None:
    """:func:`keep_alive` for a connection this process dialled to a TCP address: its
    family is known (uvloop builds an enum for ``family``, about 0.7 us)."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        _keep_alive(sock)


def _keep_alive(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


async def start_unix_server(
    handler: Handler, path: str, *, plaintext_read_size: int | None = None
) -> asyncio.Server:
    """:func:`asyncio.start_unix_server`, with :class:`WatchedReader` readers (plain ones
    unless ``plaintext_read_size``: :func:`start_server`)."""
    loop = asyncio.get_running_loop()
    return await loop.create_unix_server(_factory(handler, plaintext_read_size, loop), path)


class HelloDeadlineError(Exception):
    """The client was too slow to start or finish its hello."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.value)
        self.refusal = refusal


async def within_hello_deadlines(
    reader: asyncio.StreamReader,
    handshake: Awaitable[T],
    first_byte_s: float,
    hello_s: float,
    loop: asyncio.AbstractEventLoop | None = None,
) -> T:
    """Await ``handshake``, cut (:class:`HelloDeadlineError`) if no byte arrives within
    ``first_byte_s`` or the whole first handshake message within ``hello_s`` of now
    (``loop``: the running loop, if the caller holds it).

    Once the hello is complete the handshake has only its own timeout (KME calls may be
    slow, and they are not the client's fault). 0 turns a deadline off.
    """
    if not isinstance(reader, WatchedReader) or (first_byte_s <= 0 and hello_s <= 0):
        return await handshake
    loop = loop or asyncio.get_running_loop()
    start = loop.time()
    hello_at = start + hello_s if hello_s > 0 else None
    first_at = start + first_byte_s if first_byte_s > 0 else hello_at
    state = reader.hello.state
    deadline = aio.deadline(
        loop, {HelloState.NOTHING: first_at, HelloState.STARTED: hello_at}.get(state)
    )

    def progress(now: HelloState) -> None:
        nonlocal state
        state = now
        # Bytes may still arrive between expiry and the handshake's cancellation.
        if not deadline.expired():
            deadline.reschedule(None if now is HelloState.COMPLETE else hello_at)

    reader.on_progress = progress
    try:
        async with deadline:
            return await handshake
    except TimeoutError:
        if not deadline.expired():
            raise
        slow = Refusal.FIRST_BYTE_TIMEOUT if state is HelloState.NOTHING else None
        raise HelloDeadlineError(slow or Refusal.HELLO_TIMEOUT) from None
    finally:
        reader.on_progress = None


def reset(writer: asyncio.StreamWriter) -> int:
    """Close at once with a TCP RST (SO_LINGER 0): no FIN handshake, no TIME_WAIT here.

    How many bytes written to it the reset dropped (never passed on): those still in our
    buffer and, on Linux, those the socket had not sent yet (a reset discards its queue).
    """
    dropped = sendq.queued(writer, unacknowledged=False)
    sendq.reset(writer)
    return dropped
