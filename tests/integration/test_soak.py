"""The soak run (``qkdproxy.tools.bench.soak``): integrity, key accounting and leaks under load.

Brief by default; ``QKDPROXY_SOAK_SECONDS=120`` runs it longer. The two small tests below it
show that the soak's own checks can fail: a corrupted byte is seen in either direction, and
a reused key id is reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random

import pytest

from qkdproxy.tools.bench import soak
from qkdproxy.tools.bench.soak import (
    TRAILER,
    KeyReport,
    SoakProgress,
    SoakSettings,
    run_soak,
)

SOAK_SECONDS = float(os.environ.get("QKDPROXY_SOAK_SECONDS", "6"))
# Growth of live Python allocations allowed after everything closed. What remains after a
# run is bounded and does not grow with its length (measured: about 0.15 MB after 200 and
# after 900 connections): aiohttp's middleware cache keeps the stopped simulator's
# applications, tlslite and asyncio keep a few per-process lists. 2 MiB is over ten times
# that, and far below what one leaked object per connection would add in a run.
MEMORY_TOLERANCE = 2 * 1024 * 1024


@pytest.mark.soak
@pytest.mark.timeout(SOAK_SECONDS * 4 + 60)
async def test_soak_keeps_every_byte_and_key_and_leaks_nothing() -> None:
    settings = SoakSettings(
        seconds=SOAK_SECONDS, concurrency=6, seed=20240611, memory_tolerance_bytes=MEMORY_TOLERANCE
    )
    seen: list[SoakProgress] = []
    result = await run_soak(settings, seen.append)
    table = result.format_table()

    assert result.mismatches == 0, table
    assert result.errors == {}, table
    assert result.kme_errors == {}, table
    # Both kinds of connection ran, long flows renewed their keys, data moved both ways.
    assert result.connections > settings.concurrency, table
    assert 0 < result.long_lived < result.connections, table
    assert result.key_updates > 0, table
    assert result.bytes_up == result.bytes_down > 0, table

    keys = result.keys
    assert keys.client_handshakes == keys.server_handshakes == result.connections, table
    assert result.backend_connections == result.connections, table
    assert keys.distinct_key_ids == result.connections, table  # one fresh key per handshake
    assert keys.reused_key_ids == keys.unmatched_key_ids == 0, table
    for taken, consumed, wasted, outstanding in (keys.client_ledger, keys.server_ledger):
        assert (taken, consumed, wasted, outstanding) == (result.connections,) * 2 + (0, 0)
    assert keys.kme_delivered_twice == keys.kme_unknown_key_ids == 0, table
    assert keys.kme_duplicate_material == 0, table
    assert keys.kme_keys_made >= keys.kme_keys_delivered >= result.connections, table

    resources = result.resources
    assert resources.fd_delta <= 0, (resources.leaked_fds, table)
    assert resources.task_delta <= 0, table
    traced = resources.traced_delta
    assert traced is not None
    assert traced <= MEMORY_TOLERANCE, (resources.memory_growth_sites, table)

    assert result.ok, result.problems
    assert seen, "no progress was reported"
    assert seen[-1].connections == result.connections
    assert [p.elapsed_s for p in seen] == sorted(p.elapsed_s for p in seen)
    document = result.to_json()
    assert document["ok"] is True and document["problems"] == []
    assert document["keys"]["client_ledger"]["consumed"] == result.connections
    assert table.splitlines()[-1].split() == ["verdict", "OK"]


@pytest.mark.soak
@pytest.mark.timeout(SOAK_SECONDS * 4 + 60)
async def test_multiplexed_soak_with_rotations_loses_nothing_and_leaks_nothing() -> None:
    """Issue 18's soak: connections carried as streams of pooled tunnels that rotate every
    half second; every byte checksummed, keys spent per tunnel only, and descriptors, tasks
    and traced memory back to their baseline once the daemons stopped."""
    settings = SoakSettings(
        seconds=SOAK_SECONDS, concurrency=6, seed=20261202, multiplex=True, mux_rotate_s=0.5,
        memory_tolerance_bytes=MEMORY_TOLERANCE,
    )  # fmt: skip
    result = await run_soak(settings)
    table = result.format_table()

    assert result.mismatches == 0 and result.errors == {}, table
    assert result.bytes_up == result.bytes_down > 0, table
    assert result.server_streams == result.backend_connections == result.connections, table
    keys = result.keys
    # Rotations happened, and only tunnels spent keys: one each, never per connection.
    assert 3 <= keys.client_handshakes == keys.server_handshakes < result.connections, table
    assert keys.distinct_key_ids == keys.client_handshakes, table
    assert keys.reused_key_ids == keys.unmatched_key_ids == keys.kme_delivered_twice == 0, table
    for taken, consumed, wasted, outstanding in (keys.client_ledger, keys.server_ledger):
        assert (taken, consumed, wasted, outstanding) == (keys.client_handshakes,) * 2 + (0, 0)
    resources = result.resources
    assert resources.fd_delta <= 0 and resources.task_delta <= 0, table
    assert (resources.traced_delta or 0) <= MEMORY_TOLERANCE, table
    assert result.ok, result.problems


class _CorruptingEcho(soak.ChecksumEcho):
    """Flips one bit of what it echoes, or of what it reports having received."""

    def __init__(self, where: str) -> None:
        super().__init__()
        self.where = where

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        digest, total, flipped = hashlib.sha256(), 0, False
        try:
            while data := await reader.read(65536):
                digest.update(data)
                total += len(data)
                if self.where == "echo" and not flipped:
                    data, flipped = bytes([data[0] ^ 1]) + data[1:], True
                writer.write(data)
                await writer.drain()
            if self.where == "digest":
                digest.update(b"x")
            writer.write(TRAILER.pack(digest.digest(), total))
            writer.write_eof()
            await writer.drain()
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


@pytest.mark.parametrize(
    ("where", "kind"),
    [("echo", "backend to client"), ("digest", "client to backend"), ("none", None)],
)
async def test_the_soak_client_detects_a_corrupted_byte_either_way(
    where: str, kind: str | None
) -> None:
    backend = _CorruptingEcho(where)
    server = await asyncio.start_server(backend.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = SoakSettings(max_message_bytes=4096)
    tally = soak._Tally()
    try:
        call = soak._connection(
            port, 1, rng=random.Random(5), pool=random.Random(6).randbytes(8192), s=settings,
            t=tally,
        )  # fmt: skip
        if kind is None:
            await call
            assert tally.bytes_up == tally.bytes_down > 0
        else:
            with pytest.raises(soak._MismatchError) as info:
                await call
            assert info.value.kind == kind
            assert tally.bytes_up == 0
    finally:
        server.close()
        await server.wait_closed()


def test_key_report_names_every_broken_rule() -> None:
    clean = KeyReport(
        client_handshakes=3, server_handshakes=3, client_ledger=(4, 3, 1, 0),
        server_ledger=(3, 3, 0, 0), distinct_key_ids=3, reused_key_ids=0, unmatched_key_ids=0,
        kme_keys_made=10, kme_keys_delivered=5, kme_delivered_twice=0, kme_unknown_key_ids=0,
        kme_duplicate_material=0,
    )  # fmt: skip
    assert clean.problems == []
    broken = KeyReport(
        client_handshakes=3, server_handshakes=3, client_ledger=(4, 2, 1, 1),
        server_ledger=(3, 3, 0, 0), distinct_key_ids=2, reused_key_ids=1, unmatched_key_ids=1,
        kme_keys_made=10, kme_keys_delivered=5, kme_delivered_twice=1, kme_unknown_key_ids=1,
        kme_duplicate_material=1,
    )  # fmt: skip
    problems = " | ".join(broken.problems)
    for fragment in (
        "1 key ids used by more than one handshake",
        "recorded by one tunnel only",
        "client ledger does not balance",
        "client consumed 2 keys for 3 handshakes",
        "delivered 1 keys twice",
        "unknown to the KME",
        "share their bytes",
    ):
        assert fragment in problems
