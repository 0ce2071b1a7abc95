"""``qkdproxy bench keys``: the key economy of a client+server daemon pair.

A KME simulator (in this process) with a realistic link (10 keys/s, a 500-key pool) or a
fast one, at 0 or 100 ms per KME call; a client and a server daemon (in this process, client-
initiated flow); connections driven at a steady rate, as fast as they go, in a burst followed
by idleness, or not at all. Each scenario reports the keys the client drew from its KME and
consumed, the yield, the share of handshakes whose key came from memory, and handshake p50/p99.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

from qkdproxy.core.tls.credentials import Credentials, load_trust_anchors
from qkdproxy.daemon.app import Daemon
from qkdproxy.daemon.config import load_config
from qkdproxy.daemon.tunnel import ConnectionRecord
from qkdproxy.sim.faults import FaultScript
from qkdproxy.sim.link import LinkSettings
from qkdproxy.sim.simulator import KmePair, SimulatorSettings
from qkdproxy.tools.bench.kme_setup import SAE_CLIENT, SAE_SERVER
from qkdproxy.tools.bench.names import KEY_MODES
from qkdproxy.tools.bench.processes import BENCH_ADMISSION
from qkdproxy.tools.bench.soak import SoakSettings, _kme_table, _tunnel_table, _write
from qkdproxy.tools.certs import KMES, TRUST_DOMAIN, TUNNEL_SERVER_NAME, write_dev_pki

KEY_BITS = 256
LINKS = {
    "realistic": LinkSettings(rate_bps=10 * KEY_BITS, pool_bits=500 * KEY_BITS),
    "fast": LinkSettings(),
}
BURST = 40
MAX_CONCURRENCY = 4


@dataclass(frozen=True, slots=True)
class KeyScenario:
    """One run: a link, a KME latency, a traffic pattern, for ``seconds``."""

    link: str
    latency_ms: float
    pattern: str
    seconds: float
    mode: str = "per-connection"


@dataclass(frozen=True, slots=True)
class KeyResult:
    """What one scenario cost in keys, and how fast its handshakes were."""

    scenario: KeyScenario
    connections: int
    failed: int
    drawn: int
    consumed: int
    held_at_end: int
    from_memory: float | None
    p50_ms: float | None
    p99_ms: float | None

    def as_dict(self) -> dict[str, object]:
        """The flat row ``--json`` prints (the keys are a contract)."""
        s = self.scenario
        settled = self.drawn - self.held_at_end
        return {
            "link": s.link, "kme_latency_ms": s.latency_ms, "pattern": s.pattern,
            "mode": s.mode, "seconds": s.seconds, "connections": self.connections,
            "failed": self.failed, "keys_drawn": self.drawn, "keys_consumed": self.consumed,
            "keys_per_hour": round(self.consumed * 3600 / s.seconds) if s.seconds else None,
            "keys_held_at_end": self.held_at_end,
            # Held keys are still usable: the yield counts what has a fate.
            "yield": round(self.consumed / settled, 3) if settled else None,
            "from_memory": None if self.from_memory is None else round(self.from_memory, 3),
            "handshake_p50_ms": self.p50_ms, "handshake_p99_ms": self.p99_ms,
        }  # fmt: skip


def scenarios(
    links: Sequence[str],
    latencies: Sequence[float],
    patterns: Sequence[str],
    seconds: float,
    modes: Sequence[str] = KEY_MODES[:1],
) -> list[KeyScenario]:
    """Every combination, in a stable order."""
    return [
        KeyScenario(link, latency, pattern, seconds, mode)
        for link in links
        for latency in latencies
        for pattern in patterns
        for mode in modes
    ]


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


async def _connect_once(port: int) -> bool:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"k")
        await writer.drain()
        ok = await asyncio.wait_for(reader.read(1), 15) == b"k"
        writer.close()
        return ok
    except (OSError, TimeoutError):
        return False


async def _steady(port: int, rate: float, seconds: float) -> list[bool]:
    """One connection every 1/rate seconds (each on its own task, so a slow one does not
    delay the schedule)."""
    started, tasks = time.monotonic(), []
    for index in range(max(1, round(rate * seconds))):
        delay = started + index / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(_connect_once(port)))
    return list(await asyncio.gather(*tasks))


async def _as_fast(port: int, seconds: float) -> list[bool]:
    deadline, results = time.monotonic() + seconds, []

    async def worker() -> None:
        while time.monotonic() < deadline:
            results.append(await _connect_once(port))

    await asyncio.gather(*(worker() for _ in range(MAX_CONCURRENCY)))
    return results


async def _drive(pattern: str, port: int, seconds: float) -> list[bool]:
    if pattern.endswith("/s"):
        return await _steady(port, float(pattern[:-2]), seconds)
    if pattern == "max":
        return await _as_fast(port, seconds)
    if pattern == "burst":
        burst = list(await asyncio.gather(*(_connect_once(port) for _ in range(BURST))))
        await asyncio.sleep(seconds)
        return [*burst, await _connect_once(port)]
    await asyncio.sleep(seconds)  # idle: what does doing nothing cost?
    return []


def _percentile(samples: list[float], fraction: float) -> float | None:
    if not samples:
        return None
    ordered = sorted(samples)
    return round(ordered[min(len(ordered) - 1, int(fraction * len(ordered)))], 2)


async def _daemon(
    stack: AsyncExitStack, path: Path, text: str, records: list[ConnectionRecord]
) -> Daemon:
    daemon = Daemon(load_config(_write(path, text)), on_close=records.append)
    stack.push_async_callback(daemon.close)
    await daemon.start()
    return daemon


def _port(daemon: Daemon) -> int:
    return int(daemon.tunnels[0].bound()[0].rsplit(":", 1)[1])


async def run_scenario(scenario: KeyScenario, base: Path) -> KeyResult:
    """Start a KME pair and a daemon pair, drive the pattern, read the client's key account."""
    anchors = load_trust_anchors(base / "pki" / "ca.pem")
    credentials = [
        Credentials.load(base / "pki" / f"{k}.pem", base / "pki" / f"{k}-key.pem") for k in KMES
    ]
    settings = SimulatorSettings(
        link=LINKS[scenario.link], faults=FaultScript(fixed_ms=scenario.latency_ms)
    )
    pair = KmePair(settings, credentials, anchors)
    records: list[ConnectionRecord] = []
    # The soak's tunnel tables; a connection limit (4 x 250) no steady pattern reaches, so
    # that a saturated machine shows as slow handshakes, not as refused connections.
    shape = SoakSettings(concurrency=250)
    mux = "multiplex = true\n" if scenario.mode == "mux" else ""
    async with AsyncExitStack() as stack:
        await pair.start()
        stack.push_async_callback(pair.stop)
        backend = await asyncio.start_server(_echo, "127.0.0.1", 0)
        stack.callback(backend.close)
        server = await _daemon(
            stack, base / "server.toml",
            _kme_table(pair.urls_014[1], SAE_SERVER, SAE_CLIENT)
            + _tunnel_table("server", backend.sockets[0].getsockname()[1], shape,
                            f'allow = ["uri:spiffe://{TRUST_DOMAIN}/tunnel/client"]\n'
                            f"{BENCH_ADMISSION}\n" + mux),
            records,
        )  # fmt: skip
        client = await _daemon(
            stack, base / "client.toml",
            _kme_table(pair.urls_014[0], SAE_CLIENT, SAE_SERVER)
            + _tunnel_table("client", _port(server), shape,
                            f'server_name = "{TUNNEL_SERVER_NAME}"\n{BENCH_ADMISSION}\n' + mux),
            records,
        )  # fmt: skip
        outcomes = await _drive(scenario.pattern, _port(client), scenario.seconds)
        await asyncio.wait_for(client.tunnels[0].wait_idle(), 30)
        kme = client.kmes["local"]
        account = kme.account
        served = sum(m.counters.served_from_buffer for m in kme.masters.values())
        fetched = sum(m.counters.fetched_on_demand for m in kme.masters.values())
        result_drawn, consumed, held = account.drawn, account.fates["consumed"], account.held
    times = [r.handshake_ms for r in records if r.role == "client" and r.handshake_ms is not None]
    return KeyResult(
        scenario, len(outcomes), outcomes.count(False), result_drawn, consumed, held,
        served / (served + fetched) if served + fetched else None,
        _percentile(times, 0.5), _percentile(times, 0.99),
    )  # fmt: skip


async def run_key_bench(
    chosen: Sequence[KeyScenario], advance: Callable[[int], None] | None = None
) -> list[KeyResult]:
    """Every scenario in turn, each with fresh processes' state (same PKI)."""
    results = []
    with tempfile.TemporaryDirectory(prefix="qkdproxy-keys-") as tmp:
        base = Path(tmp)
        write_dev_pki(base / "pki")
        for scenario in chosen:
            results.append(await run_scenario(scenario, base))
            if advance is not None:
                advance(1)
    return results
