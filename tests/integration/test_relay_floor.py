"""The bench's floor relays (tools/bench/relay_floor.py) carry connections faithfully: a
floor that lost or reordered bytes, or never closed, would make its rate meaningless."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from qkdproxy.tools.bench.processes import free_port, spawn, wait_line

STEP_S = 10.0


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    # Echo until the relay passes the application's end on, then end our side too.
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


@asynccontextmanager
async def _relays() -> AsyncIterator[int]:
    async with AsyncExitStack() as stack:
        backend = await asyncio.start_server(_echo, "127.0.0.1", 0)
        stack.push_async_callback(backend.wait_closed)
        stack.callback(backend.close)
        target = backend.sockets[0].getsockname()[1]
        for role in ("server", "client"):
            listen = free_port()
            process = await spawn(
                stack, sys.executable, "-m", "qkdproxy.tools.bench.relay_floor", role,
                str(listen), str(target),
            )  # fmt: skip
            assert process.stdout is not None
            await asyncio.wait_for(wait_line(process.stdout, b"ready"), STEP_S)
            target = listen
        yield target


async def _round_trip(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    writer.write_eof()  # half-close: the answer must still come back
    answer = await asyncio.wait_for(reader.read(), STEP_S)
    writer.close()
    await writer.wait_closed()
    return answer


async def test_relays_echo_every_byte_in_order_with_half_close() -> None:
    async with _relays() as port:
        payloads = [os.urandom(size) for size in (1, 1000, 70_000, 300_000)]
        answers = await asyncio.gather(*(_round_trip(port, p) for p in payloads))
    for payload, answer in zip(payloads, answers, strict=True):
        assert hashlib.sha256(answer).digest() == hashlib.sha256(payload).digest()


async def test_relays_carry_many_sequential_connections_on_one_link() -> None:
    async with _relays() as port:
        for number in range(50):
            assert await _round_trip(port, number.to_bytes(2, "big")) == number.to_bytes(2, "big")
