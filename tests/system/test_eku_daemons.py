"""Extended Key Update between two real ``qkdproxy run`` processes and the KME simulator
process: a connection that stays up renews its keys with fresh QKD keys, checksummed both
ways, and both connection log lines name the same update key ids."""

from __future__ import annotations

import asyncio
import hashlib
import os

from tests.system.test_daemon_system import Harness, harness_fixture, pki_fixture

__all__ = ["harness_fixture", "pki_fixture"]  # the fixtures this module uses

CHUNKS = 30
PAUSE_S = 0.1  # about 3 s of traffic: several updates at a 0.5 s budget


async def test_real_daemons_renew_keys_with_fresh_qkd_keys(harness: Harness) -> None:
    _, backend_port = await harness.backend()
    settings = {"fresh_key_interval_s": 0.5, "require_fresh_key_update": True}
    server, client = await harness.pair(backend_port, server=settings, client=settings)
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    sent, echoed = hashlib.sha256(), hashlib.sha256()

    async def write() -> None:
        for _ in range(CHUNKS):
            chunk = os.urandom(32 * 1024)
            sent.update(chunk)
            writer.write(chunk)
            await writer.drain()
            await asyncio.sleep(PAUSE_S)
        writer.write_eof()

    async def read() -> None:
        while data := await reader.read(65536):
            echoed.update(data)

    await asyncio.wait_for(asyncio.gather(write(), read()), 60)
    writer.close()
    assert echoed.digest() == sent.digest()
    c = await client.proc.wait_record(lambda r: r["fresh_key_updates"] > 0)
    s = await server.proc.wait_record(lambda r: r["fresh_key_updates"] > 0)
    ids = c["fresh_key_ids"]
    assert len(ids) >= 2 and len(set(ids)) == len(ids)
    assert s["fresh_key_ids"] == ids
    assert c["qkd_key_id"] not in ids
    assert c["fresh_key_update_failures"] == s["fresh_key_update_failures"] == 0


async def test_a_multiplexed_tunnel_renews_its_keys_too(harness: Harness) -> None:
    _, backend_port = await harness.backend()
    settings = {"fresh_key_interval_s": 0.5, "multiplex": True}
    _, client = await harness.pair(backend_port, server=settings, client=settings)
    for _ in range(3):  # streams over the pooled tunnel, spread over about 2 s
        reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
        writer.write(b"x" * 1000)
        writer.write_eof()
        assert len(await asyncio.wait_for(reader.read(), 30)) == 1000
        writer.close()
        await asyncio.sleep(0.7)
    await client.proc.terminate()  # the pooled tunnel's line is written as it ends
    record = next(r for r in client.proc.records() if r.get("mux_streams"))
    assert record["fresh_key_updates"] >= 2
    assert len(set(record["fresh_key_ids"])) == len(record["fresh_key_ids"])
