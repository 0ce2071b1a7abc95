"""SocketReader over real TCP sockets: hand-over from a stream pair (or a connection dialled
with one from the start), bounded buffering when the consumer stops, partial consumption,
the end and a reset, and the writer still working."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import cast

import pytest

from qkdproxy.io import socket_reader
from qkdproxy.io.socket_reader import SMALL, SocketReader

CAPACITY = 64 * 1024


@asynccontextmanager
async def connected(
    dialled: bool = False,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter, asyncio.StreamWriter]]:
    """(our reader, our writer, the peer's writer) over loopback TCP: the side that accepted
    (a stream pair), or with ``dialled`` the side that dialled (a socket reader of
    ``CAPACITY``, which ``attach`` passes through)."""
    accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()

    async def on_connect(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await accepted.put((r, w))

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    if dialled:
        source, writer = await socket_reader.open_connection("127.0.0.1", port, CAPACITY)
        # Typed as the stream pair's reader: the scenarios only pass it to attach.
        reader = cast(asyncio.StreamReader, source)
        peer_reader, peer_writer = await accepted.get()
    else:
        peer_reader, peer_writer = await asyncio.open_connection("127.0.0.1", port)
        reader, writer = await accepted.get()
    try:
        yield reader, writer, peer_writer
    finally:
        for w in (writer, peer_writer):
            w.transport.abort()
        server.close()
        await server.wait_closed()
        del peer_reader


async def read_all(source: SocketReader, step: int | None = None) -> bytes:
    out = bytearray()
    while view := await source.peek():
        taken = view[:step] if step else view
        out += taken
        source.consume(len(taken))
    return bytes(out)


async def test_bytes_the_stream_reader_held_come_first_then_the_rest_until_eof() -> None:
    async with connected() as (reader, writer, peer):
        peer.write(b"hello ")
        await peer.drain()
        assert await reader.readexactly(2) == b"he"  # one segment: "llo " stays buffered
        source = SocketReader.attach(reader, writer, CAPACITY)
        # A few bytes handed over take a small buffer, not the capacity (idle memory).
        assert len((await source.peek()).obj) == SMALL  # type: ignore[arg-type]
        payload = os.urandom(300_000)
        peer.write(payload)
        peer.write_eof()
        # Uneven partial reads exercise the move of an unconsumed rest to the front.
        assert await read_all(source, step=10_007) == b"llo " + payload
        assert not await source.peek()  # the end stays the end


@pytest.mark.parametrize("dialled", [False, True])
async def test_a_consumer_that_stops_reading_holds_at_most_its_capacity(dialled: bool) -> None:
    async with connected(dialled) as (reader, writer, peer):
        source = SocketReader.attach(reader, writer, CAPACITY)
        block = os.urandom(1 << 20)
        sending = asyncio.ensure_future(_send(peer, block, 32))
        # The peer writes 32 MiB while nobody consumes: its writes must stall (TCP window
        # closed by the paused read side), and we never hold more than the capacity.
        done, _ = await asyncio.wait([sending], timeout=1.0)
        assert not done, "the sender finished: the receiver buffered without bound"
        view = await source.peek()
        assert len(view) <= CAPACITY
        del view
        # Reading resumes and everything arrives intact once the consumer catches up.
        received = 0
        while received < 32 << 20:
            view = await source.peek()
            assert len(view) <= CAPACITY
            assert view[:1] == block[received % len(block) : received % len(block) + 1]
            received += len(view)
            source.consume(len(view))
        await sending


async def _send(writer: asyncio.StreamWriter, block: bytes, times: int) -> None:
    for _ in range(times):
        writer.write(block)
        await writer.drain()


@pytest.mark.parametrize("dialled", [False, True])
async def test_the_writer_keeps_flow_control_and_closes_normally(dialled: bool) -> None:
    async with connected(dialled) as (reader, writer, peer):
        source = SocketReader.attach(reader, writer, CAPACITY)
        writer.write(b"answer")
        await writer.drain()
        peer.write(b"q")
        assert bytes(await source.peek()) == b"q"
        source.consume(1)
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), 5)


@pytest.mark.parametrize("dialled", [False, True])
async def test_a_reset_raises_and_a_truncated_tail_is_not_lost(dialled: bool) -> None:
    async with connected(dialled) as (reader, writer, peer):
        source = SocketReader.attach(reader, writer, CAPACITY)
        peer.write(b"partial")
        await peer.drain()
        assert bytes(await source.peek()) == b"partial"
        source.consume(3)
        assert bytes(await source.peek()) == b"tial"  # what was not consumed stays
        source.consume(4)
        sock = peer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.transport.abort()  # RST
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(read_all(source), 5)


async def test_a_dialled_connection_half_closes() -> None:
    async with connected(dialled=True) as (reader, writer, peer):
        source = SocketReader.attach(reader, writer, CAPACITY)
        peer.write(b"request")
        peer.write_eof()
        assert await read_all(source) == b"request"
        # The peer's FIN ends our reading only: the answer still goes out.
        writer.write(b"answer")
        await writer.drain()
        writer.write_eof()
        assert await asyncio.wait_for(peer_reader_of(peer).read(), 5) == b"answer"


async def test_a_dialled_connections_drain_raises_the_reset_itself() -> None:
    async with connected(dialled=True) as (reader, writer, peer):
        source = SocketReader.attach(reader, writer, CAPACITY)
        sock = peer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.transport.abort()  # RST
        with pytest.raises(ConnectionResetError) as raised:
            await asyncio.wait_for(read_all(source), 5)
        # drain reports what broke the connection, as a stream pair's does (not a
        # generic "Connection lost"); wait_closed too.
        with pytest.raises(ConnectionResetError) as drained:
            await writer.drain()
        assert drained.value is raised.value
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(writer.wait_closed(), 5)


def peer_reader_of(peer: asyncio.StreamWriter) -> asyncio.StreamReader:
    """The stream reader paired with the peer's writer."""
    reader = peer._reader  # type: ignore[attr-defined]
    assert isinstance(reader, asyncio.StreamReader)
    return reader


def test_a_capacity_below_the_small_buffer_is_refused() -> None:
    with pytest.raises(ValueError, match="needs at least"):
        SocketReader(None, None, SMALL - 1)  # type: ignore[arg-type]


async def test_a_few_waiting_bytes_hold_a_small_buffer_a_bulk_flow_the_capacity() -> None:
    # Thousands of connections with a byte waiting each must not hold the capacity each.
    async with connected() as (reader, writer, peer):
        source = SocketReader.attach(reader, writer, CAPACITY)
        peer.write(b"x")
        view = await source.peek()
        assert len(view.obj) == SMALL  # type: ignore[arg-type]
        source.consume(len(view))
        sizes = set()
        peer.write(os.urandom(4 << 20))
        received = 0
        while received < 4 << 20:
            view = await source.peek()
            sizes.add(len(view.obj))  # type: ignore[arg-type]
            received += len(view)
            source.consume(len(view))
        assert CAPACITY in sizes


class CountingTransport:
    """The part of a transport a socket reader uses: counts pauses and resumes (each an
    ``epoll_ctl`` in the event loop)."""

    def __init__(self) -> None:
        self.paused = False
        self.pauses = 0
        self.resumes = 0

    def pause_reading(self) -> None:
        self.paused = True
        self.pauses += 1

    def resume_reading(self) -> None:
        self.paused = False
        self.resumes += 1


def _receive(source: SocketReader, data: bytes) -> None:
    """What the event loop does for one receive of ``data``."""
    room = source.get_buffer(-1)
    assert len(room) >= len(data), "the event loop was asked to read into a full buffer"
    room[: len(data)] = data
    source.buffer_updated(len(data))


async def test_reading_pauses_only_when_full_or_nobody_waits_and_never_exceeds_capacity() -> None:
    transport = CountingTransport()
    source = SocketReader(cast(asyncio.Transport, transport), asyncio.Protocol(), CAPACITY)
    # Nearly full with the consumer waiting: it runs before the loop reads again, so no
    # pause/resume pair (two system calls per receive).
    waiting = asyncio.ensure_future(source.peek())
    await asyncio.sleep(0)
    _receive(source, b"a" * (SMALL - SMALL // 4))
    assert transport.pauses == 0
    view = await waiting
    assert bytes(view) == b"a" * (SMALL - SMALL // 4)
    source.consume(len(view))
    # Nearly full with nobody waiting (the consumer is busy elsewhere): pause.
    _receive(source, b"b" * (CAPACITY - 100))
    assert transport.paused and transport.pauses == 1
    view = await source.peek()
    source.consume(len(view))
    assert not transport.paused
    # A receive that fills the buffer pauses even with the consumer waiting: the loop
    # asks for more room right away, and a full buffer has none.
    waiting = asyncio.ensure_future(source.peek())
    await asyncio.sleep(0)
    _receive(source, b"c" * CAPACITY)
    assert transport.paused and transport.pauses == 2
    view = await waiting
    assert len(view) == CAPACITY
    # A partial record left: the rest moves to the front, and reading resumes only once
    # a receive's worth of room is free.
    source.consume(10)
    assert transport.paused
    source.consume(SMALL - 10)
    assert not transport.paused
    _receive(source, b"d" * SMALL)  # nobody waits: full again, paused
    assert transport.paused
    assert bytes(await source.peek()) == b"c" * (CAPACITY - SMALL) + b"d" * SMALL
