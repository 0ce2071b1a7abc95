"""The process-wide pool of record output buffers, seen from two connections at once.

Connection ``slow`` has a backend that barely reads: its pump's transport holds views of
opened batches (pooled buffers) for a long time, and its client keeps what it received
as views. Connection ``fast`` meanwhile seals and opens batch after batch through the
same pool. A pooled buffer reused while anything still refers to it would show up as a
wrong digest on either side of either connection; every byte is checked.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager

import pytest

from qkdproxy.core.tls import records
from qkdproxy.daemon.pump import Traffic, pump
from qkdproxy.io.peer_channel import PeerChannel
from qkdproxy.keys.sources import KeySources
from tests.integration.test_data_path_attack import CHUNKS, HELD, digest, run, slow_read
from tests.integration.test_eku_attack import Streams, stream_pair

SIZE = 2 << 20


@asynccontextmanager
async def backend_link() -> AsyncIterator[
    tuple[asyncio.StreamReader, asyncio.StreamWriter, asyncio.StreamReader, asyncio.StreamWriter]
]:
    """A connected pair: the pump's plaintext side and the backend, with small kernel
    buffers so the transports (not the kernel) hold what waits."""
    accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()

    async def on_connect(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await accepted.put((r, w))

    listener = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    plain_reader, plain_writer = await asyncio.open_connection("127.0.0.1", port)
    plain_writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 14)
    backend_reader, backend_writer = await accepted.get()
    backend_writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 14)
    try:
        yield plain_reader, plain_writer, backend_reader, backend_writer
    finally:
        plain_writer.close()
        backend_writer.close()
        listener.close()
        await listener.wait_closed()


async def fast_read(reader: asyncio.StreamReader) -> tuple[int, str]:
    hashed, total = hashlib.sha256(), 0
    while chunk := await reader.read(1 << 18):
        hashed.update(chunk)
        total += len(chunk)
    return total, hashed.hexdigest()


async def tunnel(streams: Streams, *, slow: bool, seed: int) -> list[int]:
    """Both directions of one tunnelled connection, every byte checked; returns what the
    pump's plaintext transport held at most while its backend read (slow) or []."""
    into_backend, from_backend = os.urandom(SIZE), os.urandom(SIZE)
    async with backend_link() as (plain_reader, plain_writer, backend_reader, backend_writer):
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
            sizes, pos = random.Random(seed), 0
            while pos < SIZE:
                size = sizes.choice(CHUNKS)
                await client.send(memoryview(into_backend)[pos : pos + size])
                pos += size
            await client.send_fin()

        async def client_receive() -> tuple[int, str]:
            # Kept as received (views of opened batches), hashed only at the end: a pooled
            # buffer reused under them would show as changed bytes.
            received = []
            while parts := await client.receive_parts():
                received.extend(parts)
                await asyncio.sleep(0)
            return digest(b"".join(received))

        async def backend_send() -> None:
            sizes, pos = random.Random(seed + 1), 0
            while pos < SIZE:
                size = sizes.choice(CHUNKS)
                backend_writer.write(from_backend[pos : pos + size])
                await backend_writer.drain()
                pos += size
            backend_writer.write_eof()

        backend = (
            slow_read(backend_reader, plain_writer.transport, held)
            if slow
            else fast_read(backend_reader)
        )
        _, at_client, _, at_backend = await asyncio.gather(
            client_send(), client_receive(), backend_send(), backend
        )
        assert await pumping == "closed"
    assert at_backend == digest(into_backend)
    assert at_client == digest(from_backend)
    return held


def counting_reuse(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the batches that got a buffer back from the pool (not a new one)."""
    reused: list[int] = []
    original: Callable[[int], bytearray] = records._reusable

    def reusable(size: int) -> bytearray:
        before = {id(buffer) for buffer in records._POOL}
        buffer = original(size)
        if id(buffer) in before:
            reused.append(size)
        return buffer

    monkeypatch.setattr(records, "_reusable", reusable)
    return reused


async def _two_connections_share_the_pool() -> None:
    async with AsyncExitStack() as stack:
        slow_pair = await stack.enter_async_context(stream_pair())
        fast_pair = await stack.enter_async_context(stream_pair())
        async with asyncio.timeout(60):
            held, _ = await asyncio.gather(
                tunnel(slow_pair, slow=True, seed=1), tunnel(fast_pair, slow=False, seed=3)
            )
    assert max(held) >= HELD, "the slow backend's transport never held pooled bytes"


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_slow_connections_pooled_bytes_survive_a_busy_neighbour(
    loop: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    records.drop_pooled_buffers()
    reused = counting_reuse(monkeypatch)
    run(loop, _two_connections_share_the_pool)
    # The pool was in play: the test would see a buffer reused too early.
    assert len(reused) > 10
