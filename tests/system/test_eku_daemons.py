"""Extended Key Update between two real ``qkdproxy run`` processes and the KME simulator
process: a connection that stays up renews its keys with fresh QKD keys, checksummed both
ways, and both connection log lines name the same update key ids."""

from __future__ import annotations

import asyncio
import hashlib
import os
from typing import Any

from tests.system.test_daemon_system import Harness, harness_fixture, pki_fixture

__all__ = ["harness_fixture", "pki_fixture"]  # the fixtures this module uses

CHUNKS = 30
PAUSE_S = 0.1  # about 3 s of traffic: several updates at a 0.5 s budget


def assert_same_updates(c: dict[str, Any], s: dict[str, Any]) -> None:
    """Both ends list the same completed updates, in order. One exception, at the end: an
    update that met the connection's close. The initiator completes when it sends
    new_key_update, the responder when it reads it; if the responder's close_notify
    crossed it, the initiator counts it completed and the responder abandoned (its key is
    spent on both sides either way, and nothing was protected by the new keys)."""
    ours, theirs = c["fresh_key_ids"], s["fresh_key_ids"]
    if ours == theirs:
        return
    longer, shorter = (c, s) if len(ours) > len(theirs) else (s, c)
    assert longer["fresh_key_ids"][:-1] == shorter["fresh_key_ids"], (ours, theirs)
    assert shorter["fresh_key_updates_abandoned"] == 1, shorter


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
    assert_same_updates(c, s)
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
