"""Extended Key Update under ordinary TCP flow control, between two real ``qkdproxy run``
processes: a backend that stops reading for longer than ``handshake_timeout_s`` holds the
tunnel's pipe full, so an update's request waits behind the data. That is a slow consumer,
not a stuck peer: the connection must survive it with every byte intact."""

from __future__ import annotations

import asyncio
import hashlib
import os

from tests.system.test_daemon_system import Harness, harness_fixture, pki_fixture

__all__ = ["harness_fixture", "pki_fixture"]  # the fixtures this module uses

VOLUME = 48 << 20  # more than the sockets and buffers along the path hold
CHUNK = 1 << 20
HANDSHAKE_TIMEOUT_S = 2.0
STALL_S = 5.0  # the backend reads nothing this long: past the update deadline and a poll


async def test_a_backend_that_pauses_reading_does_not_cut_an_updating_tunnel(
    harness: Harness,
) -> None:
    backend, backend_port = await harness.backend(gated=True)
    settings = {"fresh_key_interval_s": 0.5, "handshake_timeout_s": HANDSHAKE_TIMEOUT_S}
    _, client = await harness.pair(backend_port, server=settings, client=settings)
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    sent, echoed = hashlib.sha256(), hashlib.sha256()

    async def write() -> None:
        for _ in range(VOLUME // CHUNK):
            chunk = os.urandom(CHUNK)
            sent.update(chunk)
            writer.write(chunk)
            await writer.drain()  # blocks while the backend reads nothing
        writer.write_eof()

    async def read() -> None:
        while data := await reader.read(1 << 16):
            echoed.update(data)

    tasks = [asyncio.create_task(write()), asyncio.create_task(read())]
    try:
        await asyncio.sleep(STALL_S)  # real processes: the stall is wall-clock time
        backend.release.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        writer.close()
    assert echoed.digest() == sent.digest()
    record = await client.proc.wait_record()
    assert record["fresh_key_update_failures"] == 0
