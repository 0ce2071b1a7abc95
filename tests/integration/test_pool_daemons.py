"""Two tunnelled connections through real daemons in one process (so one record-buffer
pool for both daemons and both connections), per connection and multiplexed: one
application reads its echo slowly, so the client daemon's transport towards it holds
views of pooled batches, while the other pushes data as fast as it can. Every byte is
checked on both connections."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from pathlib import Path

import pytest

from qkdproxy.core.tls import records
from tests.integration.test_mux import MUX
from tests.integration.test_tunnel_runtime import port, setup

SIZE = 3 << 20


async def echo_through(client_port: int, payload: bytes, *, slow: bool) -> tuple[int, str]:
    """Send ``payload`` through the tunnel to the echo backend and read the echo (a little
    at a time when ``slow``); the echo's length and digest."""
    reader, writer = await asyncio.open_connection("127.0.0.1", client_port)
    if slow:
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 14)

    async def send() -> None:
        view = memoryview(payload)
        for start in range(0, len(payload), 100_003):
            writer.write(view[start : start + 100_003])
            await writer.drain()
        writer.write_eof()

    async def receive() -> tuple[int, str]:
        hashed, total = hashlib.sha256(), 0
        while chunk := await reader.read(997 if slow else 1 << 18):
            hashed.update(chunk)
            total += len(chunk)
            if slow:
                await asyncio.sleep(0)
        return total, hashed.hexdigest()

    _, echoed = await asyncio.gather(send(), receive())
    writer.close()
    return echoed


@pytest.mark.parametrize("extra", ["", MUX], ids=["per_connection", "multiplexed"])
async def test_a_slow_application_and_a_busy_one_each_get_exactly_their_bytes(
    tmp_path: Path, extra: str
) -> None:
    records.drop_pooled_buffers()
    slow, fast = os.urandom(SIZE), os.urandom(SIZE)
    async with (
        setup(tmp_path) as s,
        s.daemon("server", s.server_toml(extra)) as server,
        s.daemon("client", s.client_toml(port(server), extra)) as client,
    ):
        async with asyncio.timeout(60):
            got = await asyncio.gather(
                echo_through(port(client), slow, slow=True),
                echo_through(port(client), fast, slow=False),
            )
    assert got[0] == (len(slow), hashlib.sha256(slow).hexdigest())
    assert got[1] == (len(fast), hashlib.sha256(fast).hexdigest())
