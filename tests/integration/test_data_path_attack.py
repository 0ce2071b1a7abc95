"""The in-place data path under a slow application, on both event loops the daemon runs on.

asyncio's and uvloop's transports may keep a reference to what ``write`` was given while
the socket is full (uvloop always does, asyncio from Python 3.12): a view handed downstream
must not be into a buffer that is reused afterwards. Every byte is checked by digest.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import itertools
import os
import random
import socket
import struct
from collections.abc import Awaitable, Callable

import pytest
import uvloop

from qkdproxy.core.tls.records import MAX_PLAINTEXT
from qkdproxy.daemon.pump import Traffic, pump
from qkdproxy.io.peer_channel import PeerChannel
from qkdproxy.io.socket_reader import SocketReader
from qkdproxy.keys.sources import KeySources
from tests.integration import test_socket_reader as reader_tests
from tests.integration.test_eku_attack import stream_pair
from tests.integration.test_records import read_exactly, read_until_failure

SIZE = 3 << 20
# What the pump's transport must hold before the slow backend reads at all.
HELD = 64 * 1024
# Sizes around the 16 KiB record (and its frame header), a receive and a pump read.
CHUNKS = (1, 100, 4095, 16_379, 16_380, 16_381, 70_000, 131_072, 200_000)


def run(loop: str, scenario: Callable[[], Awaitable[None]]) -> None:
    """Run ``scenario`` on asyncio's own loop or on uvloop (the daemon's, when installed)."""
    if loop == "uvloop":
        uvloop.run(scenario())  # type: ignore[arg-type]
    else:
        asyncio.run(scenario())  # type: ignore[arg-type]


def digest(data: bytes) -> tuple[int, str]:
    return len(data), hashlib.sha256(data).hexdigest()


async def slow_read(
    reader: asyncio.StreamReader, writer: asyncio.WriteTransport, held: list[int]
) -> tuple[int, str]:
    """Read to the end a little at a time, yielding between reads: ``writer``, the other
    end's transport, fills up and holds what it was given (its largest backlog goes to
    ``held``)."""
    hashed, total = hashlib.sha256(), 0
    await until(lambda: writer.get_write_buffer_size() >= HELD)  # the backlog grows
    while chunk := await reader.read(997):
        hashed.update(chunk)
        total += len(chunk)
        held.append(writer.get_write_buffer_size())
        await asyncio.sleep(0)
    return total, hashed.hexdigest()


async def _both_directions_through_a_slow_backend() -> None:
    into_backend, from_backend = os.urandom(SIZE), os.urandom(SIZE)
    accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()

    async def on_connect(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await accepted.put((r, w))

    listener = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    async with stream_pair() as streams:
        plain_reader, plain_writer = await asyncio.open_connection("127.0.0.1", port)
        # Small kernel buffers: the transport, not the kernel, holds what waits.
        plain_writer.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 14
        )
        backend_reader, backend_writer = await accepted.get()
        backend_writer.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 14
        )
        pumping = asyncio.create_task(
            pump(
                plain_reader,
                plain_writer,
                PeerChannel(streams.server, KeySources()),
                Traffic(),
                idle_timeout_s=120,
            )
        )
        client = PeerChannel(streams.client, KeySources())
        held: list[int] = []

        async def client_send() -> None:
            sizes, pos = random.Random(7), 0
            while pos < SIZE:
                size = sizes.choice(CHUNKS)
                await client.send(memoryview(into_backend)[pos : pos + size])
                pos += size
            await client.send_fin()

        async def client_receive() -> tuple[int, str]:
            # What receive returned is kept as it is (views included), not copied: a buffer
            # reused by a later receive would show here as changed bytes.
            received = []
            while data := await client.receive():
                received.append(data)
                await asyncio.sleep(0)
            return digest(b"".join(received))

        async def backend_send() -> None:
            sizes, pos = random.Random(8), 0
            while pos < SIZE:
                size = sizes.choice(CHUNKS)
                backend_writer.write(from_backend[pos : pos + size])
                await backend_writer.drain()
                pos += size
            backend_writer.write_eof()

        async with asyncio.timeout(120):
            _, at_client, _, at_backend = await asyncio.gather(
                client_send(),
                client_receive(),
                backend_send(),
                slow_read(backend_reader, plain_writer.transport, held),
            )
            await pumping
        plain_writer.close()
        backend_writer.close()
    listener.close()
    await listener.wait_closed()
    assert at_backend == digest(into_backend)
    assert at_client == digest(from_backend)
    assert max(held) >= HELD, "the pump's writes never waited in its transport"


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_every_byte_survives_a_slow_backend_in_both_directions(loop: str) -> None:
    run(loop, _both_directions_through_a_slow_backend)


@pytest.mark.parametrize(
    "scenario",
    [
        reader_tests.test_bytes_the_stream_reader_held_come_first_then_the_rest_until_eof,
        reader_tests.test_a_few_waiting_bytes_hold_a_small_buffer_a_bulk_flow_the_capacity,
        reader_tests.test_a_dialled_connection_half_closes,
        reader_tests.test_a_dialled_connections_drain_raises_the_reset_itself,
    ]
    + [
        functools.partial(test, dialled)
        for test in (
            reader_tests.test_a_consumer_that_stops_reading_holds_at_most_its_capacity,
            reader_tests.test_the_writer_keeps_flow_control_and_closes_normally,
            reader_tests.test_a_reset_raises_and_a_truncated_tail_is_not_lost,
        )
        for dialled in (False, True)
    ],
    ids=lambda f: (
        f"{f.func.__name__.removeprefix('test_')}[{'dialled' if f.args[0] else 'accepted'}]"
        if isinstance(f, functools.partial)
        else f.__name__.removeprefix("test_")
    ),
)
def test_the_socket_reader_behaves_the_same_on_uvloop(
    scenario: Callable[[], Awaitable[None]],
) -> None:
    # The daemon runs on uvloop when it is installed: its transports switch protocols,
    # pause and hand out read buffers in their own way (and dial with a socket reader).
    run("uvloop", scenario)


async def until(condition: Callable[[], bool]) -> None:
    """Yield to the loop until ``condition`` holds (bounded by the caller's timeout)."""
    while not condition():  # noqa: ASYNC110 - transport and reader state, polled in a test
        await asyncio.sleep(0.001)


async def _handover_of_a_paused_reader_that_saw_the_end() -> None:
    async with reader_tests.connected() as (reader, writer, peer):
        payload = os.urandom(300_000)
        peer.write(payload)
        peer.write_eof()
        async with asyncio.timeout(10):
            # More than the stream reader holds before it pauses its transport.
            await until(lambda: len(reader._buffer) > 2 * reader._limit)  # type: ignore[attr-defined]
            assert await reader.readexactly(1) == payload[:1]
            source = SocketReader.attach(reader, writer, reader_tests.CAPACITY)
            assert await reader_tests.read_all(source, step=50_000) == payload[1:]
            assert not await source.peek()


async def _handover_after_the_end() -> None:
    async with reader_tests.connected() as (reader, writer, peer):
        peer.write(b"last words")
        peer.write_eof()
        async with asyncio.timeout(10):
            await until(lambda: reader._eof)  # type: ignore[attr-defined]
            source = SocketReader.attach(reader, writer, reader_tests.CAPACITY)
            assert await reader_tests.read_all(source) == b"last words"


async def _handover_after_a_reset() -> None:
    async with reader_tests.connected() as (reader, writer, peer):
        peer.write(b"cut")
        await peer.drain()
        sock = peer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.transport.abort()  # RST
        async with asyncio.timeout(10):
            await until(lambda: reader.exception() is not None)
            source = SocketReader.attach(reader, writer, reader_tests.CAPACITY)
            with pytest.raises(ConnectionError):
                await reader_tests.read_all(source)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize(
    "scenario",
    [
        _handover_of_a_paused_reader_that_saw_the_end,
        _handover_after_the_end,
        _handover_after_a_reset,
    ],
    ids=lambda f: f.__name__.removeprefix("_handover_"),
)
def test_a_stream_reader_is_taken_over_whatever_it_already_saw(
    loop: str, scenario: Callable[[], Awaitable[None]]
) -> None:
    run(loop, scenario)


@pytest.mark.parametrize("cut", [0, 3, 5, 6, 1000, -1])
async def test_a_tcp_fin_inside_or_after_a_batch_is_a_truncation_never_an_end(cut: int) -> None:
    # Genuine records, then the first ``cut`` bytes of one more (0: none, -1: all but its
    # last byte), then FIN, in one segment: the genuine bytes come, then a truncation.
    async with stream_pair() as s:
        await s.client.write(b"ready")
        assert await read_exactly(s.server, 5) == b"ready"
        layer = s.client._layer
        layer.send_data(b"g" * 3000)
        layer.send_data(os.urandom(MAX_PLAINTEXT))
        genuine = bytes(layer.data_to_send())
        layer.send_data(os.urandom(5000))  # never whole
        tail = bytes(layer.data_to_send())
        s.client._driver.writer.write(genuine + tail[:cut])
        s.client._driver.writer.write_eof()
        s.client.abort("the test ended the transport")  # no close_notify behind the FIN
        received, error = await read_until_failure(s.server)
        assert error.truncated
        assert len(received) == 3000 + MAX_PLAINTEXT and received.startswith(b"g" * 3000)


class PiecesChannel:
    """A tunnel side that hands out what it received only as separate pieces."""

    def __init__(self, batches: list[list[memoryview]]) -> None:
        self.batches = batches
        self.sent = bytearray()

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        self.sent += data

    async def send_fin(self) -> None:
        pass

    async def receive(self) -> bytes:
        raise AssertionError("the pump asked for the pieces joined")

    async def receive_parts(self) -> list[memoryview]:
        await asyncio.sleep(0)
        return self.batches.pop(0) if self.batches else []

    async def update_keys(self) -> None:
        pass

    async def close(self) -> None:
        pass


async def _pieces_reach_the_backend_in_order() -> None:
    payload = os.urandom(300_000)
    view = memoryview(payload)
    cuts = [0, 1, 16_380, 16_381, 100_000, 131_072, 250_000, len(payload)]
    pieces = [view[a:b] for a, b in itertools.pairwise(cuts)]
    channel = PiecesChannel([pieces[:1], pieces[1:4], pieces[4:]])
    ours, backend = socket.socketpair()
    plain_reader, plain_writer = await asyncio.open_connection(sock=ours)
    backend_reader, backend_writer = await asyncio.open_connection(sock=backend)
    backend_writer.write(b"upload")
    backend_writer.write_eof()
    traffic = Traffic()

    async def pumped() -> str:
        try:
            return await pump(plain_reader, plain_writer, channel, traffic, idle_timeout_s=30)
        finally:
            plain_writer.close()  # a pump that failed must not leave the backend waiting

    async with asyncio.timeout(30):
        reason, received = await asyncio.gather(pumped(), backend_reader.read())
    backend_writer.close()
    assert reason == "closed"
    assert received == payload  # every piece, in order, then the end (write_eof)
    assert traffic.from_peer == len(payload)
    assert channel.sent == b"upload"


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_the_pump_writes_received_pieces_without_joining_them(loop: str) -> None:
    """A receiving daemon copies no byte between its records and the send call: the
    channel's payload views go to the plaintext side as they are, in order, and the
    channel's end (no pieces) becomes the plaintext side's end."""
    run(loop, _pieces_reach_the_backend_in_order)
