"""Reading a connected socket straight into a reused buffer (:class:`asyncio.BufferedProtocol`).

An :class:`asyncio.StreamReader` costs three copies of every received byte (the event loop's
bytes object, the reader's buffer, the slice ``read`` returns) and a Python call chain per
receive. A :class:`SocketReader` takes over the transport of an open stream pair: the kernel
writes into its buffer, the consumer looks at the bytes in place (:meth:`SocketReader.peek`)
and says how many it used (:meth:`SocketReader.consume`).

The stream pair's writer keeps working: flow control (``drain``) and the end of the
connection (``wait_closed``) are forwarded to the stream protocol the reader replaced.
A connection this side dials (:func:`open_connection`) gets its reader from the start: no
stream reader is built only to be replaced.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import cast

__all__ = [
    "MIN_FREE",
    "SMALL",
    "SocketReader",
    "accepting",
    "drop_spare_buffers",
    "open_connection",
    "open_unix_connection",
]

# Never ask the kernel for less than this: reading pauses when less is free.
MIN_FREE = 16 * 1024
# A reader starts with a buffer this small and takes its full capacity only once a receive
# brought more than half of it (a bulk flow): thousands of connections with a few bytes
# waiting each hold this much, not the capacity.
SMALL = 2 * MIN_FREE
# Buffers of consumers that used up what they were lent: an idle connection holds none,
# a busy one takes and returns one per receive without allocating (or zeroing) it again.
_SPARE: dict[int, list[bytearray]] = {}
# At most 2 MiB kept with 256 KiB readers (8 of them).
SPARE_BUFFERS = 8


def drop_spare_buffers() -> None:
    """Forget the spare buffers (a cache: a measurement of live memory after a run drops it
    first)."""
    _SPARE.clear()


def _take(capacity: int) -> bytearray:
    spare = _SPARE.get(capacity)
    return spare.pop() if spare else bytearray(capacity)


def _give_back(buffer: bytearray) -> None:
    spare = _SPARE.setdefault(len(buffer), [])
    if len(spare) < SPARE_BUFFERS:
        spare.append(buffer)


class SocketReader(asyncio.BufferedProtocol):
    """The receiving side of a connected transport, read into one buffer of ``capacity``.

    At most ``capacity`` bytes wait unconsumed: reading pauses (the kernel's window closes
    towards the peer) until the consumer catches up. The view :meth:`peek` returns is valid
    until the next :meth:`consume`, and only until then.
    """

    def __init__(
        self,
        transport: asyncio.Transport,
        previous: asyncio.BaseProtocol,
        capacity: int,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        if capacity < SMALL:
            raise ValueError(f"a socket reader needs at least {SMALL} bytes")
        # Held for peek's futures (looked up on the first wait if not given): a look-up
        # per wait costs a getpid() on Python 3.11.
        self._loop = loop
        self._transport = transport
        self._previous = previous
        self._full_size = capacity
        self._capacity = SMALL
        self._bulk = False  # the last buffer held more than half of a small one
        self._buffer: bytearray | None = None
        self._start = 0
        self._end = 0
        self._paused = False
        self._eof = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        # A consumer that runs on the event loop's callbacks instead of awaiting peek().
        self._listener: Callable[[], None] | None = None

    @classmethod
    def attach(
        cls,
        reader: asyncio.StreamReader | SocketReader,
        writer: asyncio.StreamWriter,
        capacity: int,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> SocketReader:
        """Take over the receiving side of an open stream pair; ``reader`` must not be used
        afterwards (the bytes it held come first). A socket reader already reads it.
        ``loop``: the running loop, if the caller holds it."""
        if isinstance(reader, SocketReader):
            return reader
        # uvloop's transports are not registered as asyncio.Transport, but are ones.
        transport = cast(asyncio.Transport, writer.transport)
        self = cls(transport, transport.get_protocol(), capacity, loop)
        # StreamReader has no public way to hand over what it buffered.
        leftover: bytearray = reader._buffer  # type: ignore[attr-defined]
        if leftover:
            # Sized by what waits: a few bytes (a peer's first frames) must not cost the
            # connection a large buffer.
            self._capacity = max(SMALL, len(leftover) + MIN_FREE)
            self._buffer = _take(SMALL) if self._capacity == SMALL else bytearray(self._capacity)
            self._buffer[: len(leftover)] = leftover
            self._end = len(leftover)
            leftover.clear()
        self._eof = reader.at_eof()
        self._error = reader.exception()
        transport.set_protocol(self)
        if self._capacity - self._end < MIN_FREE:
            self._paused = True
            transport.pause_reading()
        else:
            transport.resume_reading()  # the stream reader may have paused it
        return self

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """A dialled connection is up (:func:`open_connection`)."""
        self._transport = cast(asyncio.Transport, transport)

    # ------------------------------------------------------------- the consumer

    async def peek(self) -> memoryview:
        """The bytes received and not consumed yet (waiting for some); empty at the end.

        Raises what broke the connection (a reset), like :meth:`asyncio.StreamReader.read`.
        """
        while True:
            if self._error is not None:
                raise self._error
            if self._end > self._start:
                assert self._buffer is not None
                return memoryview(self._buffer)[self._start : self._end]
            if self._eof:
                return memoryview(b"")
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def ready(self) -> memoryview | None:
        """:meth:`peek` without waiting: None when nothing arrived yet (a consumer given
        to :meth:`listen` is called again when something does)."""
        if self._error is not None:
            raise self._error
        if self._end > self._start:
            assert self._buffer is not None
            return memoryview(self._buffer)[self._start : self._end]
        return memoryview(b"") if self._eof else None

    @property
    def buffered(self) -> int:
        """Bytes received and not consumed yet."""
        return self._end - self._start

    def listen(self, listener: Callable[[], None] | None) -> None:
        """Call ``listener`` (from the event loop's callbacks) whenever bytes, the end or an
        error arrive, instead of waking :meth:`peek`; it takes what it can with
        :meth:`ready` and :meth:`consume` before it returns. None: stop."""
        self._listener = listener

    def consume(self, count: int) -> None:
        """``count`` bytes at the front were used (the view :meth:`peek` gave is dead)."""
        self._start += count
        if self._start >= self._end:
            self._bulk = self._end > SMALL // 2
            self._start = self._end = 0
            if self._buffer is not None and len(self._buffer) in (SMALL, self._full_size):
                _give_back(self._buffer)
            self._buffer = None
        elif self._capacity - self._end < MIN_FREE:
            # Move what is left to the front so the kernel has room again.
            assert self._buffer is not None
            left = self._end - self._start
            self._buffer[:left] = self._buffer[self._start : self._end]
            self._start, self._end = 0, left
        if self._paused and self._capacity - self._end >= MIN_FREE:
            self._paused = False
            self._transport.resume_reading()

    # ------------------------------------------------------------- the event loop

    def get_buffer(self, sizehint: int) -> memoryview:
        """Where the next receive goes: the free end of the buffer."""
        if self._buffer is None:
            self._capacity = self._full_size if self._bulk else SMALL
            self._buffer = _take(self._capacity)
        return memoryview(self._buffer)[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` arrived; wake the consumer, pause reading if the buffer is nearly full.

        A consumer waiting for bytes runs before the event loop polls again: then reading
        pauses only if the buffer is full (the loop asks for more room at once after a
        receive that filled it). Pausing and resuming on every receive costs two
        ``epoll_ctl`` calls. A consumer busy elsewhere (waiting for its own writes to
        drain) gets the pause as before, so at most ``capacity`` bytes ever wait.
        """
        self._end += nbytes
        if self._listener is not None:
            # It consumes now, if it can: pause only if too little is left afterwards.
            self._listener()
            if not self._paused and self._capacity - self._end < MIN_FREE:
                self._paused = True
                self._transport.pause_reading()
            return
        free = self._capacity - self._end
        if free < MIN_FREE and (not free or self._waiter is None):
            self._paused = True
            self._transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool | None:
        """The peer half-closed; the writing side stays open (as with a stream pair)."""
        self._eof = True
        self._wake()
        return self._previous.eof_received()  # type: ignore[attr-defined,no-any-return]

    def connection_lost(self, exc: Exception | None) -> None:
        """The connection ended; with ``exc`` it broke (reads raise it)."""
        if exc is not None:
            self._error = exc
        self._eof = True
        self._wake()
        self._previous.connection_lost(exc)

    def pause_writing(self) -> None:
        """The writer's flow control lives in the stream protocol."""
        self._previous.pause_writing()

    def resume_writing(self) -> None:
        """The writer's flow control lives in the stream protocol."""
        self._previous.resume_writing()

    def _wake(self) -> None:
        if self._listener is not None:
            self._listener()
        elif self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class _WriterSide(asyncio.streams.FlowControlMixin):
    """What a :class:`asyncio.StreamWriter` needs of its protocol, for a connection read by
    a :class:`SocketReader` from the start: flow control and the end of the connection, as
    :class:`asyncio.StreamReaderProtocol` gives them."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self._closed: asyncio.Future[None] = loop.create_future()
        self._broken_by: Exception | None = None

    def eof_received(self) -> bool:
        """Keep the writing side open after the peer's FIN (half-close)."""
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        """Wake drains (they raise) and ``wait_closed``."""
        self._broken_by = exc
        super().connection_lost(exc)
        if not self._closed.done():
            if exc is None:
                self._closed.set_result(None)
            else:
                self._closed.set_exception(exc)
                self._closed.exception()  # nobody may wait for it: not "never retrieved"

    async def _drain_helper(self) -> None:
        # What broke the connection (a reset), as a stream pair's drain raises it: the
        # stream reader's exception.
        if self._broken_by is not None:
            raise self._broken_by
        await super()._drain_helper()  # type: ignore[misc]

    def _get_close_waiter(self, stream: asyncio.StreamWriter) -> asyncio.Future[None]:
        return self._closed


def _dialling(loop: asyncio.AbstractEventLoop, capacity: int) -> Callable[[], SocketReader]:
    def factory() -> SocketReader:
        # Its transport is set by connection_made.
        return SocketReader(cast(asyncio.Transport, None), _WriterSide(loop), capacity, loop)

    return factory


async def _dialled(
    opened: Awaitable[tuple[asyncio.BaseTransport, SocketReader]],
    loop: asyncio.AbstractEventLoop,
) -> tuple[SocketReader, asyncio.StreamWriter]:
    transport, reader = await opened
    writer = asyncio.StreamWriter(cast(asyncio.Transport, transport), reader._previous, None, loop)
    return reader, writer


async def open_connection(
    host: str, port: int, capacity: int, loop: asyncio.AbstractEventLoop | None = None
) -> tuple[SocketReader, asyncio.StreamWriter]:
    """:func:`asyncio.open_connection`, read by a :class:`SocketReader` of ``capacity``
    (``loop``: the running loop, if the caller holds it)."""
    loop = loop or asyncio.get_running_loop()
    return await _dialled(loop.create_connection(_dialling(loop, capacity), host, port), loop)


async def open_unix_connection(
    path: str, capacity: int
) -> tuple[SocketReader, asyncio.StreamWriter]:
    """:func:`asyncio.open_unix_connection`, read by a :class:`SocketReader`."""
    loop = asyncio.get_running_loop()
    return await _dialled(loop.create_unix_connection(_dialling(loop, capacity), path), loop)


Accepted = Callable[[SocketReader, asyncio.StreamWriter], Coroutine[object, object, None]]


class _AcceptedReader(SocketReader):
    """An accepted connection's reader, which starts its handler as the connection is made
    (as :func:`asyncio.start_server` does with a stream pair)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, handler: Accepted, capacity: int) -> None:
        super().__init__(cast(asyncio.Transport, None), _WriterSide(loop), capacity, loop)
        self._started_by = loop
        self._handler = handler
        self._task: asyncio.Task[None] | None = None  # held: the loop keeps tasks weakly

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Start the handler with this reader and the connection's writer."""
        super().connection_made(transport)
        writer = asyncio.StreamWriter(self._transport, self._previous, None, self._started_by)
        self._task = self._started_by.create_task(self._handler(self, writer))


def accepting(
    handler: Accepted, capacity: int, loop: asyncio.AbstractEventLoop
) -> Callable[[], SocketReader]:
    """A listener's protocol factory: every accepted connection is read by a
    :class:`SocketReader` of ``capacity`` from the start (no stream reader built only to be
    replaced) and handed with its writer to ``handler``, in a task of its own."""
    return lambda: _AcceptedReader(loop, handler, capacity)
