"""``qkdproxy bench handshake``: full TLS 1.3 handshakes over loopback, per group.

Groups are measured round-robin in one process, so slow drift of the machine affects all of
them alike and the ratios between groups stay comparable.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass

from qkdproxy.core.tls.engine import DEFAULT_ENGINE
from qkdproxy.core.tls.keyexchange import Flow, KeyApi, QkdOptions
from qkdproxy.io.aio import loop_name
from qkdproxy.io.peer_channel import open_peer_channel
from qkdproxy.io.tls_stream import TlsStream
from qkdproxy.keys.sources import KeySources
from qkdproxy.tools.bench.kme_setup import simulated_kme_sources
from qkdproxy.tools.loopback import loopback_pair, resolve_groups

WARMUP = 5


@dataclass(frozen=True, slots=True)
class HandshakeResult:
    """Figures for one group; the first four keys are read by other tools."""

    group: str
    flow: str
    qkd: bool
    median_ms: float
    p90_ms: float
    handshakes_per_s: float
    mean_ms: float
    stdev_ms: float
    iterations: int
    ratio_to_baseline: float
    event_loop: str
    key_source: str
    kme_latency_ms: float
    prefetch: bool
    tls_engine: str = DEFAULT_ENGINE

    def as_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return asdict(self)


def _percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


@dataclass(frozen=True, slots=True)
class KeySourceChoice:
    """Where QKD keys come from: the in-process link, or the KME simulator over mTLS."""

    api: KeyApi | None = None
    kme_latency_ms: float = 0.0
    prefetch: bool = True

    @property
    def label(self) -> str:
        """``in-process`` or ``etsi-014`` / ``etsi-004``."""
        return f"etsi-{self.api.value}" if self.api else "in-process"


@asynccontextmanager
async def _sources(choice: KeySourceChoice) -> AsyncIterator[tuple[KeySources, KeySources] | None]:
    if choice.api is None:
        yield None
        return
    async with simulated_kme_sources(choice.kme_latency_ms, choice.prefetch, choice.api) as sources:
        yield sources


async def _end_like_a_tunnel(stream: TlsStream, sources: KeySources) -> None:
    """Announce our next keys, send FIN, and read to the end (taking the peer's
    announcements), as a tunnel connection between qkdproxy peers does."""
    channel = await open_peer_channel(stream, sources)
    if channel is not None:
        await channel.send_fin()
        while await channel.receive():
            pass
    await stream.close()


async def run_handshake_bench(
    group_names: Sequence[str],
    flow: Flow,
    iterations: int,
    keys: KeySourceChoice | None = None,
    tls_engine: str = DEFAULT_ENGINE,
) -> list[HandshakeResult]:
    """Measure ``iterations`` handshakes per group with the ``tls_engine`` handshake engine;
    the first group is the baseline."""
    keys = keys or KeySourceChoice()
    groups = resolve_groups(group_names)
    options = QkdOptions(flow=flow, api=keys.api or KeyApi.ETSI_014)
    samples: dict[str, list[float]] = {g.group.name: [] for g in groups}
    async with (
        _sources(keys) as sources,
        loopback_pair(groups, sources=sources, peer_protocol=True, tls_engine=tls_engine) as pair,
    ):
        pair.server_keys.options = QkdOptions(api=options.api)
        clients = {g.group.name: pair.client([g], options) for g in groups}
        for round_no in range(WARMUP + iterations):
            for name, client in clients.items():
                started = time.perf_counter()
                stream = await pair.handshake(client)
                elapsed = time.perf_counter() - started
                await _end_like_a_tunnel(stream, pair.client_keys.sources)
                if round_no >= WARMUP:
                    samples[name].append(elapsed)
    loop = loop_name()
    baseline = statistics.median(samples[groups[0].group.name])
    return [
        HandshakeResult(
            group=g.group.name,
            flow=flow.value.split("-")[0],
            qkd=g.group.qkd,
            median_ms=statistics.median(s) * 1000,
            p90_ms=_percentile(s, 0.9) * 1000,
            handshakes_per_s=len(s) / sum(s),
            mean_ms=statistics.fmean(s) * 1000,
            stdev_ms=statistics.pstdev(s) * 1000,
            iterations=len(s),
            ratio_to_baseline=statistics.median(s) / baseline,
            event_loop=loop,
            key_source=keys.label,
            kme_latency_ms=keys.kme_latency_ms,
            prefetch=keys.prefetch,
            tls_engine=tls_engine,
        )
        for g in groups
        for s in [samples[g.group.name]]
    ]
