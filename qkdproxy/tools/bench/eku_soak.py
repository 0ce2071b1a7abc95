"""A long connection renewing its keys with fresh QKD keys (Extended Key Update), checked.

In this process, on loopback, as :mod:`qkdproxy.tools.bench.soak` sets them up: the KME simulator
pair (ETSI 014 over mutual TLS) with a recording link model, an echo backend, and a server
and a client tunnel built by :class:`qkdproxy.daemon.Daemon` from configuration files with
``fresh_key_interval_s`` set. One client connection moves seeded random bytes both ways for
``seconds``: it writes continuously (paced) and reads the echo back concurrently, hashing
both; then it half-closes and reads to the end.

Checked afterwards: both digests and lengths equal; the Extended Key Updates the two
tunnels' connection records report (same count, same key ids); every update key id distinct,
not the handshake's, and delivered exactly once by the KME; the key ledgers balanced. The
longest gap between two echoed chunks while data was flowing is reported (the stall an
update may cause).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import tempfile
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

from qkdproxy.core.tls.keyexchange import Flow
from qkdproxy.daemon.tunnel import ConnectionRecord
from qkdproxy.sim.faults import FaultScript
from qkdproxy.sim.simulator import KmePair, SimulatorSettings
from qkdproxy.tools.bench.keys import _daemon
from qkdproxy.tools.bench.kme_setup import SAE_CLIENT, SAE_SERVER
from qkdproxy.tools.bench.soak import _kme_table, _port, recording_kme_pair
from qkdproxy.tools.certs import TRUST_DOMAIN, TUNNEL_SERVER_NAME

CHUNK = 16 * 1024


@dataclass(frozen=True, slots=True)
class EkuSoakSettings:
    """``seconds`` of traffic at about ``bytes_per_s`` each way; an update every
    ``interval_s`` (the tunnels' ``fresh_key_interval_s``)."""

    seconds: float = 10.0
    interval_s: float = 1.0
    bytes_per_s: int = 2 * 1024 * 1024
    group: str = "qkd_mlkem768"
    seed: int = 17
    # Added to every KME call by the simulator (the KME round trip an update may wait for).
    kme_delay_ms: float = 0.0
    flow: Flow = Flow.CLIENT_INITIATED
    api: str = "014"  # or "004" (the KME check of each delivery is for ETSI 014 only)


@dataclass(slots=True)
class EkuSoakResult:
    """What the run saw; :meth:`problems` lists what is wrong (empty: all good)."""

    seconds: float = 0.0
    bytes_sent: int = 0
    bytes_echoed: int = 0
    digests_equal: bool = False
    updates: dict[str, int] = field(default_factory=dict)
    update_failures: dict[str, int] = field(default_factory=dict)
    key_ids: dict[str, list[str]] = field(default_factory=dict)
    handshake_key_id: str | None = None
    kme_deliveries: dict[str, int] = field(default_factory=dict)
    ledgers: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    max_gap_s: float = 0.0

    def problems(self) -> list[str]:
        """Everything that contradicts a correct run."""
        found = []
        if not self.digests_equal or self.bytes_sent != self.bytes_echoed:
            found.append(f"echo differs: sent {self.bytes_sent}, got {self.bytes_echoed}")
        client, server = self.key_ids.get("client", []), self.key_ids.get("server", [])
        if client != server:
            found.append("the two tunnels report different update key ids")
        if len(set(client)) != len(client) or self.handshake_key_id in client:
            found.append("a QKD key id was used twice")
        twice = [k for k, n in self.kme_deliveries.items() if n != 1]
        if twice:
            found.append(f"{len(twice)} update keys not delivered exactly once by the KME")
        if any(self.update_failures.values()):
            found.append(f"failed updates: {self.update_failures}")
        for side, (taken, consumed, wasted) in self.ledgers.items():
            if taken != consumed + wasted:
                found.append(f"{side} ledger unbalanced: {taken} != {consumed} + {wasted}")
        return found


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        await writer.drain()
    writer.close()


async def _traffic(port: int, s: EkuSoakSettings, result: EkuSoakResult) -> None:
    rng = random.Random(s.seed)  # noqa: S311 - test data, not secrets
    pool = rng.randbytes(1 << 20)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sent, echoed = hashlib.sha256(), hashlib.sha256()
    deadline = time.monotonic() + s.seconds
    writing = True

    async def write() -> None:
        nonlocal writing
        offset = 0
        while time.monotonic() < deadline:
            chunk = pool[offset : offset + CHUNK] or pool[:CHUNK]
            offset = (offset + CHUNK) % len(pool)
            sent.update(chunk)
            result.bytes_sent += len(chunk)
            writer.write(chunk)
            await writer.drain()
            await asyncio.sleep(CHUNK / s.bytes_per_s)
        writing = False
        writer.write_eof()

    async def read() -> None:
        last: float | None = None  # from the first echo on: the handshake is not a gap
        while data := await reader.read(65536):
            now = time.monotonic()
            if writing and last is not None:
                result.max_gap_s = max(result.max_gap_s, now - last)
            last = now
            echoed.update(data)
            result.bytes_echoed += len(data)

    await asyncio.gather(write(), read())
    writer.close()
    result.digests_equal = sent.digest() == echoed.digest()


async def run_eku_soak(s: EkuSoakSettings) -> EkuSoakResult:
    """Run the soak once (see the module docstring)."""
    result = EkuSoakResult()
    records: list[ConnectionRecord] = []
    extra = f"fresh_key_interval_s = {s.interval_s}\nrequire_fresh_key_update = true\n"
    with tempfile.TemporaryDirectory(prefix="qkdproxy-eku-soak-") as tmp:
        base = Path(tmp)
        simulator = SimulatorSettings(faults=FaultScript(fixed_ms=s.kme_delay_ms))
        pair, link = recording_kme_pair(base / "pki", simulator)
        async with AsyncExitStack() as stack:
            await pair.start()
            stack.push_async_callback(pair.stop)
            listener = await asyncio.start_server(_echo, "127.0.0.1", 0)
            stack.push_async_callback(listener.wait_closed)
            stack.callback(listener.close)
            backend = listener.sockets[0].getsockname()[1]
            server = await _daemon(
                stack, base / "server.toml",
                _kme(s, pair, 1, SAE_SERVER, SAE_CLIENT)
                + _tunnel(s, "server", backend,
                          f'allow = ["uri:spiffe://{TRUST_DOMAIN}/tunnel/client"]\n' + extra),
                records,
            )  # fmt: skip
            client = await _daemon(
                stack, base / "client.toml",
                _kme(s, pair, 0, SAE_CLIENT, SAE_SERVER)
                + _tunnel(s, "client", _port(server),
                          f'server_name = "{TUNNEL_SERVER_NAME}"\nflow = "{s.flow.value}"\n'
                          + extra),
                records,
            )  # fmt: skip
            started = time.monotonic()
            await _traffic(_port(client), s, result)
            for daemon in (client, server):
                await asyncio.wait_for(daemon.tunnels[0].wait_idle(), 30.0)
            result.seconds = time.monotonic() - started
            for daemon, side in ((client, "client"), (server, "server")):
                book = daemon.tunnels[0].keys.ledger
                result.ledgers[side] = (book.taken, book.consumed, book.wasted)
        for record in records:
            result.updates[record.role] = record.fresh_key_updates
            result.update_failures[record.role] = record.fresh_key_update_failures
            result.key_ids[record.role] = list(record.fresh_key_ids)
            result.handshake_key_id = record.qkd_key_id
        for key_id in result.key_ids.get("client", []) if s.api == "014" else []:
            raw = bytes.fromhex(key_id.replace("-", ""))
            result.kme_deliveries[key_id] = link.delivered[raw]
        link.forget()
    return result


def _kme(s: EkuSoakSettings, pair: KmePair, index: int, sae: str, peer: str) -> str:
    table = _kme_table(pair.urls_014[index], sae, peer)
    if s.api == "014":
        return table
    address = f'address = "127.0.0.1:{pair.ports_004[index]}"\npeer_stream_wait_s = 5.0\n'
    return table.replace(f'url = "{pair.urls_014[index]}"\n', f'api = "004"\n{address}')


def _tunnel(s: EkuSoakSettings, role: str, connect: int, extra: str) -> str:
    return (
        f'[[tunnel]]\nname = "eku"\nrole = "{role}"\nlisten = "127.0.0.1:0"\n'
        f'connect = "127.0.0.1:{connect}"\ncert = "pki/tunnel-{role}.pem"\n'
        f'key = "pki/tunnel-{role}-key.pem"\nca = "pki/ca.pem"\nkme = "local"\n'
        f'policy = "qkd-pq-required"\ngroups = ["{s.group}"]\n{extra}'
    )
