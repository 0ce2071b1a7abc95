"""``qkdproxy bench handshake --tunnels``: the paper's Table I through real tunnels.

Per scenario (KME latency x prefetch on/off), the KME simulator, a server daemon and a client
daemon run as three processes on loopback. The client daemon has one tunnel per (group, flow);
the server daemon accepts them all. Each connection opens, sends a byte, gets it back and
closes; the handshake time is the one the client daemon logs for that connection (TCP connect
to the peer excluded, KME calls included), so both daemons' real code paths are measured.
QKD-KEM groups are compared with the PQ-only group of the same KEMs in the same scenario.
"""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from qkdproxy.core.groups import DEFAULT_GROUPS, GroupSpec
from qkdproxy.core.hybrid import GroupUnavailableError, resolve
from qkdproxy.core.kem import default_registry
from qkdproxy.tools.bench.loadgen import connect_once, echo_backend
from qkdproxy.tools.bench.output import Advance
from qkdproxy.tools.bench.plot import BarChart
from qkdproxy.tools.bench.processes import ClientTunnel, DaemonPair, start_daemon_pair, workspace

WARMUP = 3
RECORD_TIMEOUT_S = 30.0
FLOWS = {"client": "client-initiated", "server": "server-initiated"}


@dataclass(frozen=True, slots=True)
class Scenario:
    """KME conditions shared by every group measured together (and the daemons' TLS
    handshake engine: the configuration's default when None)."""

    kme_latency_ms: float
    prefetch: bool
    tls_engine: str | None = None


@dataclass(frozen=True, slots=True)
class TunnelHandshakeResult:
    """One group, one flow, one scenario."""

    group: str
    flow: str
    qkd: bool
    median_ms: float
    p90_ms: float
    # 1000 / mean handshake ms: what one sequential stream of handshakes could sustain,
    # not a measured connection rate (that is ``bench connrate``).
    handshakes_per_s: float
    mean_ms: float
    std_ms: float
    p99_ms: float
    kme_latency_ms: float
    prefetch: bool
    iterations: int
    pq_counterpart: str | None
    ratio_to_pq: float | None

    def as_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return asdict(self)


# The table's columns, most telling first (every field is in --json and --csv).
TABLE_COLUMNS = (
    "group", "flow", "kme_latency_ms", "prefetch", "median_ms", "ratio_to_pq", "p90_ms",
    "p99_ms", "pq_counterpart",
)  # fmt: skip


def with_counterparts(groups: Sequence[GroupSpec]) -> list[GroupSpec]:
    """``groups`` with, before each QKD group, its PQ-only counterpart if it runs here."""
    runnable = [g for g in DEFAULT_GROUPS.all() if _available(g)]
    out: list[GroupSpec] = []
    for group in groups:
        counterpart = pq_counterpart(group, runnable) if group.qkd else None
        if counterpart is not None and counterpart not in out and counterpart not in groups:
            out.append(counterpart)
        if group not in out:
            out.append(group)
    return out


def table_groups() -> list[GroupSpec]:
    """Every available QKD group and, first, the PQ-only group with the same KEMs."""
    runnable = [g for g in DEFAULT_GROUPS.all() if _available(g)]
    chosen: list[GroupSpec] = []
    for group in runnable:
        if not group.qkd:
            continue
        counterpart = pq_counterpart(group, runnable)
        if counterpart is not None and counterpart not in chosen:
            chosen.append(counterpart)
        chosen.append(group)
    return chosen


def pq_counterpart(group: GroupSpec, candidates: Sequence[GroupSpec]) -> GroupSpec | None:
    """The non-QKD post-quantum group with exactly ``group``'s KEM components, if any."""
    for candidate in candidates:
        if (
            not candidate.qkd
            and candidate.post_quantum
            and candidate.components == group.components
        ):
            return candidate
    return None


def _available(group: GroupSpec) -> bool:
    try:
        resolve(group, default_registry())
    except GroupUnavailableError:
        return False
    return True


def _tunnels(groups: Sequence[GroupSpec], flows: Sequence[str]) -> list[ClientTunnel]:
    tunnels = []
    for group in groups:
        # A PQ-only handshake involves no KME: its flow setting changes nothing.
        for flow in flows if group.qkd else flows[:1]:
            policy = "qkd-pq-required" if group.qkd else "pq-required"
            tunnels.append(ClientTunnel(_name(group, flow), [group.name], FLOWS[flow], policy))
    return tunnels


def _name(group: GroupSpec, flow: str) -> str:
    return f"{group.name}-{flow}"


async def _records_for(pair: DaemonPair, tunnel: str, count: int) -> list[float]:
    """Handshake times the client daemon logged for ``tunnel`` (waits for ``count``)."""
    async with asyncio.timeout(RECORD_TIMEOUT_S):
        while True:
            times = [
                float(r["handshake_ms"])  # type: ignore[arg-type]
                for r in pair.client_records
                if r.get("tunnel") == tunnel and r.get("handshake_ms") is not None
            ]
            if len(times) >= count:
                return times
            await asyncio.sleep(0.05)


async def _run_scenario(
    scenario: Scenario,
    groups: Sequence[GroupSpec],
    flows: Sequence[str],
    iterations: int,
    advance: Advance | None,
) -> dict[str, list[float]]:
    tunnels = _tunnels(groups, flows)
    async with workspace(echo_backend) as work:
        pair = await start_daemon_pair(
            work.stack, work.base, work.backend_port, clients=tunnels,
            server_groups=[g.name for g in groups], kme_latency_ms=scenario.kme_latency_ms,
            prefetch=scenario.prefetch, tls_engine=scenario.tls_engine,
        )  # fmt: skip
        samples = {}
        for tunnel in tunnels:
            for _ in range(WARMUP + iterations):
                await connect_once(pair.ports[tunnel.name])
            times = await _records_for(pair, tunnel.name, WARMUP + iterations)
            samples[tunnel.name] = times[WARMUP:]
            if advance is not None:
                advance()
        return samples


def _percentile(ordered: list[float], fraction: float) -> float:
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _summaries(
    scenario: Scenario,
    groups: Sequence[GroupSpec],
    flows: Sequence[str],
    samples: dict[str, list[float]],
) -> list[TunnelHandshakeResult]:
    results = []
    for group in groups:
        # A PQ-only group is its own baseline (ratio 1): every PQ row has both columns.
        counterpart = pq_counterpart(group, groups) if group.qkd else group
        if not counterpart or not counterpart.post_quantum:
            counterpart = None
        baseline = statistics.median(samples[_name(counterpart, flows[0])]) if counterpart else None
        for flow in flows if group.qkd else flows[:1]:
            ordered = sorted(samples[_name(group, flow)])
            median = statistics.median(ordered)
            results.append(
                TunnelHandshakeResult(
                    group=group.name,
                    flow=flow if group.qkd else "-",
                    qkd=group.qkd,
                    median_ms=median,
                    p90_ms=_percentile(ordered, 0.9),
                    handshakes_per_s=1000 * len(ordered) / sum(ordered),
                    mean_ms=statistics.fmean(ordered),
                    std_ms=statistics.pstdev(ordered),
                    p99_ms=_percentile(ordered, 0.99),
                    kme_latency_ms=scenario.kme_latency_ms,
                    prefetch=scenario.prefetch,
                    iterations=len(ordered),
                    pq_counterpart=counterpart.name if counterpart else None,
                    ratio_to_pq=median / baseline if baseline else None,
                )
            )
    return results


async def run_tunnel_handshake_bench(
    groups: Sequence[GroupSpec],
    flows: Sequence[str],
    scenarios: Sequence[Scenario],
    iterations: int,
    advance: Advance | None = None,
) -> list[TunnelHandshakeResult]:
    """Every group (and flow, for QKD groups) in every scenario, through real daemons."""
    results: list[TunnelHandshakeResult] = []
    for scenario in scenarios:
        samples = await _run_scenario(scenario, groups, flows, iterations, advance)
        results += _summaries(scenario, groups, flows, samples)
    return results


def tunnel_count(groups: Sequence[GroupSpec], flows: Sequence[str]) -> int:
    """Client tunnels per scenario (the progress bar's unit)."""
    return len(_tunnels(groups, flows))


def charts(results: Sequence[TunnelHandshakeResult]) -> list[BarChart]:
    """One panel per flow: median handshake by group, one bar per scenario (log scale)."""
    panels = []
    for flow in dict.fromkeys(r.flow for r in results if r.flow != "-"):
        rows = [r for r in results if r.flow in (flow, "-")]
        groups = list(dict.fromkeys(r.group for r in rows))
        scenarios = list(dict.fromkeys((r.kme_latency_ms, r.prefetch) for r in rows))
        by_key = {(r.group, r.kme_latency_ms, r.prefetch): r.median_ms for r in rows}
        errors = {(r.group, r.kme_latency_ms, r.prefetch): r.std_ms for r in rows}
        series = {_scenario_label(s): [by_key.get((g, *s)) for g in groups] for s in scenarios}
        spread = {_scenario_label(s): [errors.get((g, *s)) for g in groups] for s in scenarios}
        title = f"TLS 1.3 handshake through the tunnel, {flow}-initiated QKD keys (median, std)"
        panels.append(BarChart(title, "ms (log scale)", groups, series, True, spread))
    return panels


def _scenario_label(scenario: tuple[float, bool]) -> str:
    latency, prefetch = scenario
    return f"KME {latency:g} ms, prefetch {'on' if prefetch else 'off'}"
