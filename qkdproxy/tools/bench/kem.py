"""``qkdproxy bench kem``: KEM operation times, plain and QKD-KEM (the paper's Figs. 3 and 4).

For every available QKD-KEM group, each operation is timed twice: the post-quantum KEM alone,
and the QKD-KEM operation as a TLS endpoint performs it in the client-initiated flow with
keys from the KME simulator (ETSI 014 over mutual TLS on loopback):
- keygen: key pair, then a fresh QKD key from the client's KME (``enc_keys``);
- encaps: encapsulation, then the same key by id from the server's KME (``dec_keys``);
- decaps: decapsulation, then the secret with the held QKD key appended (no KME call).
Without prefetching (the default, like the paper) every keygen and encaps waits on its KME,
so the simulator's injected latency shows directly.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass

from qkdproxy.core.groups import DEFAULT_GROUPS, GroupKind
from qkdproxy.core.hybrid import (
    ClientPrivate,
    GroupUnavailableError,
    HybridKem,
    attach_key_id,
    detach_key_id,
    resolve,
    with_qkd_key,
)
from qkdproxy.core.kem import default_registry
from qkdproxy.keys.sources import KeySources
from qkdproxy.tools.bench.kme_setup import simulated_kme_sources
from qkdproxy.tools.bench.output import Advance
from qkdproxy.tools.bench.plot import BarChart

OPERATIONS = ("keygen", "encaps", "decaps")


@dataclass(frozen=True, slots=True)
class KemOpResult:
    """One KEM, one operation, plain or QKD-KEM, at one KME latency."""

    kem: str
    group: str
    operation: str
    qkd: bool
    kme_latency_ms: float
    prefetch: bool
    iterations: int
    median_ms: float
    mean_ms: float
    std_ms: float
    p99_ms: float

    def as_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return asdict(self)


def qkd_kem_groups() -> list[HybridKem]:
    """Every single-KEM QKD group whose KEM runs on this machine, in table order."""
    available = []
    for group in DEFAULT_GROUPS.all():
        if group.kind is not GroupKind.QKD_KEM:
            continue
        try:
            available.append(resolve(group, default_registry()))
        except GroupUnavailableError:
            continue
    return available


Timer = Callable[[], Awaitable[None]]


async def _time(operation: Timer, iterations: int) -> list[float]:
    samples = []
    for _ in range(iterations):
        started = time.perf_counter()
        await operation()
        samples.append(time.perf_counter() - started)
    return samples


class _Round:
    """The state one QKD-KEM exchange passes between its three operations."""

    def __init__(self, kem: HybridKem, client: KeySources, server: KeySources) -> None:
        self.kem = kem
        self.client = client
        self.server = server
        self.share = b""
        self.reply = b""
        self.private: ClientPrivate | None = None
        self.qkd_key = b""

    async def keygen(self) -> None:
        self.private, public = self.kem.generate()
        assert self.client.master is not None
        key = await self.client.master.take_key()
        self.qkd_key = key.material
        self.share = attach_key_id(public, key.key_id)

    async def encaps(self) -> None:
        public, key_id = detach_key_id(self.share, self.kem.public_size)
        ciphertext, secret = self.kem.encapsulate(public)
        assert self.server.slave is not None
        key = await self.server.slave.get_key(key_id)
        with_qkd_key(secret, key.material)
        self.reply = attach_key_id(ciphertext, key_id)

    async def decaps(self) -> None:
        ciphertext, _ = detach_key_id(self.reply, self.kem.ciphertext_size)
        assert self.private is not None
        with_qkd_key(self.kem.decapsulate(self.private, ciphertext), self.qkd_key)


async def _qkd_samples(
    kem: HybridKem, sources: tuple[KeySources, KeySources], iterations: int
) -> dict[str, list[float]]:
    """Full exchanges in order, each operation timed (encaps needs that round's keygen)."""
    samples: dict[str, list[float]] = {op: [] for op in OPERATIONS}
    exchange = _Round(kem, *sources)
    for _ in range(iterations):
        for op in OPERATIONS:
            started = time.perf_counter()
            await getattr(exchange, op)()
            samples[op].append(time.perf_counter() - started)
    return samples


async def _plain_samples(kem: HybridKem, iterations: int) -> dict[str, list[float]]:
    _, public = kem.generate()
    # A secret key serves one decapsulation (liboqs frees it): one fresh pair per sample.
    pairs = []
    for _ in range(iterations):
        private, own_public = kem.generate()
        pairs.append((private, kem.encapsulate(own_public)[0]))

    async def keygen() -> None:
        kem.generate()

    async def encaps() -> None:
        kem.encapsulate(public)

    async def decaps() -> None:
        private, ciphertext = pairs.pop()
        kem.decapsulate(private, ciphertext)

    return {
        "keygen": await _time(keygen, iterations),
        "encaps": await _time(encaps, iterations),
        "decaps": await _time(decaps, iterations),
    }


def _result(
    kem: HybridKem, op: str, qkd: bool, samples: list[float], *, latency: float, prefetch: bool
) -> KemOpResult:
    ordered = sorted(samples)
    return KemOpResult(
        kem=kem.components[0].name,
        group=kem.group.name,
        operation=op,
        qkd=qkd,
        kme_latency_ms=latency,
        prefetch=prefetch,
        iterations=len(ordered),
        median_ms=statistics.median(ordered) * 1000,
        mean_ms=statistics.fmean(ordered) * 1000,
        std_ms=statistics.pstdev(ordered) * 1000,
        p99_ms=ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000,
    )


async def run_kem_bench(
    iterations: int,
    latencies_ms: Sequence[float] = (0.0, 100.0),
    prefetch: bool = False,
    advance: Advance | None = None,
) -> list[KemOpResult]:
    """Time every operation of every available KEM, plain and QKD-KEM, at each latency."""
    kems = qkd_kem_groups()
    results: list[KemOpResult] = []
    for latency in latencies_ms:
        async with simulated_kme_sources(latency, prefetch) as sources:
            for kem in kems:
                measured = {
                    False: await _plain_samples(kem, iterations),
                    True: await _qkd_samples(kem, sources, iterations),
                }
                for op in OPERATIONS:
                    for qkd in (False, True):
                        results.append(
                            _result(
                                kem, op, qkd, measured[qkd][op], latency=latency, prefetch=prefetch
                            )
                        )
                if advance is not None:
                    advance()
    return results


def charts(results: Sequence[KemOpResult]) -> list[BarChart]:
    """One log-scale panel per KME latency: operations by KEM, plain beside QKD-KEM."""
    panels = []
    for latency in dict.fromkeys(r.kme_latency_ms for r in results):
        rows = [r for r in results if r.kme_latency_ms == latency]
        kems = list(dict.fromkeys(r.kem for r in rows))
        by_key = {(r.kem, r.operation, r.qkd): r.median_ms for r in rows}
        series = {
            f"{op}{' + QKD' if qkd else ''}": [by_key.get((k, op, qkd)) for k in kems]
            for op in OPERATIONS
            for qkd in (False, True)
        }
        panels.append(
            BarChart(
                f"KEM operations, KME latency {latency:g} ms (median)",
                "ms (log scale)",
                kems,
                series,
                log_scale=True,
            )
        )
    return panels
