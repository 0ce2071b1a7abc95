"""Results of ``bench connrate`` and ``bench throughput``, and what follows from them.

Pure: ratios to the stunnel pair measured in the same run, and sanity checks of the
baseline against what is documented for it (docs/BENCHMARKS.md, issue 16), so that a
stalled or load-limited baseline is reported instead of flattering the tunnel.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import TypeVar

STUNNEL = "stunnel"
RELAY_FLOOR = "relay-floor"
DIRECT = "direct"
GB = 1e9  # bytes: per GB, like Gbit/s, is decimal

# What a sane stunnel pair (TLS 1.3, mutual TLS, no resumption) does on loopback: a few
# per cent of the direct path's connection rate (issue 16: 281-517/s against 7-13k/s), about
# a fifth to a third of its bulk rate (3.7-6.8 of 20 Gbit/s), and it is busy (CPU-bound)
# for most of each sequential connection. Far below these, the baseline is broken.
MIN_STUNNEL_CONN_SHARE = 0.01
MIN_STUNNEL_GBIT_SHARE = 0.05
MAX_IDLE_FACTOR = 3.0  # wall time per sequential connection over the CPU time it used
STALL_P99_FACTOR = 5.0
STALL_P99_EXTRA_MS = 10.0
# A load generator (and backend) busy for this share of a run may be what limits it.
LOAD_BUSY_SHARE = 0.8
LOADED_PER_CORE = 0.5


@dataclass(frozen=True, slots=True)
class ConnrateResult:
    """New connections per second through one path, and what each cost."""

    path: str
    concurrency: int
    conn_per_s: float
    p50_ms: float
    p99_ms: float
    connections: int
    # QKD keys the measurement consumed (distinct key ids in the client daemon's lines);
    # None for paths without QKD.
    keys: int | None = None
    # CPU time of the path's tunnel processes (both ends) per connection; None for direct.
    cpu_ms_per_conn: float | None = None
    # The KME simulator's CPU per connection (qkdproxy paths only).
    kme_cpu_ms_per_conn: float | None = None
    # The load generator's and the backend's CPU per connection.
    load_cpu_ms_per_conn: float = 0.0
    # Resident memory of both tunnel processes per idle open connection.
    kib_per_idle_conn: float | None = None
    vs_stunnel: float | None = None
    cpu_vs_stunnel: float | None = None
    kib_vs_stunnel: float | None = None
    generator: str = ""
    # Measurements combined into this row, taken in turn with the other paths'.
    rounds: int = 1

    def as_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return asdict(self)


def combine_rounds(rounds: Sequence[ConnrateResult], keys: int | None) -> ConnrateResult:
    """One row from the rounds of one path and concurrency, each measured in turn with the
    other paths' (so a machine that slows down mid-run weighs on every path alike): the
    connections over the time they all took, the median of the rounds' p50s, the highest
    p99, CPU per connection over all of them; ``keys``: distinct keys over all rounds."""
    first = rounds[0]
    total = sum(r.connections for r in rounds)
    seconds = sum(r.connections / r.conn_per_s for r in rounds)

    def per_connection(value: Callable[[ConnrateResult], float | None]) -> float | None:
        values = [value(r) for r in rounds]
        if any(v is None for v in values):
            return None
        return sum(v * r.connections for v, r in zip(values, rounds, strict=True) if v) / total

    load = per_connection(lambda r: r.load_cpu_ms_per_conn)
    return replace(
        first,
        conn_per_s=total / seconds,
        p50_ms=statistics.median(r.p50_ms for r in rounds),
        p99_ms=max(r.p99_ms for r in rounds),
        connections=total,
        keys=keys,
        cpu_ms_per_conn=per_connection(lambda r: r.cpu_ms_per_conn),
        kme_cpu_ms_per_conn=per_connection(lambda r: r.kme_cpu_ms_per_conn),
        load_cpu_ms_per_conn=load or 0.0,
        rounds=len(rounds),
    )


@dataclass(frozen=True, slots=True)
class ThroughputResult:
    """One path, one stream count, and the CPU each GB cost."""

    path: str
    streams: int
    gbit_s: float
    bytes: int
    seconds: float
    # CPU time of the path's tunnel processes (both ends) per GB moved; None for direct.
    cpu_s_per_gb: float | None = None
    kme_cpu_s_per_gb: float | None = None
    load_cpu_s_per_gb: float = 0.0
    vs_stunnel: float | None = None
    cpu_vs_stunnel: float | None = None
    generator: str = ""

    def as_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return asdict(self)


def ratio(value: float | None, base: float | None) -> float | None:
    """``value / base``, or None when either is missing or the base is zero."""
    if value is None or not base:
        return None
    return value / base


Result = TypeVar("Result", ConnrateResult, ThroughputResult)


def _with_ratios(
    results: Sequence[Result],
    level: Callable[[Result], int],
    fill: Callable[[Result, Result], Result],
) -> list[Result]:
    baseline = {level(r): r for r in results if r.path == STUNNEL}
    return [fill(r, baseline[level(r)]) if level(r) in baseline else r for r in results]


def connrate_ratios(results: Sequence[ConnrateResult]) -> list[ConnrateResult]:
    """Each row against the stunnel row of its concurrency (unchanged without stunnel)."""
    return _with_ratios(
        results, lambda r: r.concurrency,
        lambda r, base: replace(
            r, vs_stunnel=ratio(r.conn_per_s, base.conn_per_s),
            cpu_vs_stunnel=ratio(r.cpu_ms_per_conn, base.cpu_ms_per_conn),
            kib_vs_stunnel=ratio(r.kib_per_idle_conn, base.kib_per_idle_conn),
        ),
    )  # fmt: skip


def throughput_ratios(results: Sequence[ThroughputResult]) -> list[ThroughputResult]:
    """Each row against the stunnel row of its stream count (unchanged without stunnel)."""
    return _with_ratios(
        results, lambda r: r.streams,
        lambda r, base: replace(
            r, vs_stunnel=ratio(r.gbit_s, base.gbit_s),
            cpu_vs_stunnel=ratio(r.cpu_s_per_gb, base.cpu_s_per_gb),
        ),
    )  # fmt: skip


def machine_note(load_average: float, cores: int) -> str | None:
    """A note when other work loads the machine (wall-clock figures suffer, CPU less)."""
    if load_average <= LOADED_PER_CORE * cores:
        return None
    return (
        f"the machine was loaded (1-minute load average {load_average:.2f} on {cores} cores): "
        "rates and latencies are lower than on a quiet machine; CPU per connection and per "
        "GB much less affected"
    )


def _lowest(results: Sequence[Result], path: str, level: Callable[[Result], int]) -> Result | None:
    rows = sorted((r for r in results if r.path == path), key=level)
    return rows[0] if rows else None


def connrate_warnings(results: Sequence[ConnrateResult]) -> list[str]:
    """What looks wrong with the baseline (or the load) in a connection-rate run."""
    warnings = []
    level = lambda r: r.concurrency  # noqa: E731 - a key, used twice
    stunnel, direct = _lowest(results, STUNNEL, level), _lowest(results, DIRECT, level)
    if stunnel is not None and stunnel.concurrency == 1:
        if direct is not None and stunnel.conn_per_s < MIN_STUNNEL_CONN_SHARE * direct.conn_per_s:
            warnings.append(
                f"stunnel's sequential rate ({stunnel.conn_per_s:.0f}/s) is below "
                f"{MIN_STUNNEL_CONN_SHARE:.0%} of the direct path's ({direct.conn_per_s:.0f}/s); "
                "a sane stunnel pair does a few per cent: the baseline looks broken"
            )
        busy_ms = (stunnel.cpu_ms_per_conn or 0.0) + stunnel.load_cpu_ms_per_conn
        wall_ms = 1000 / stunnel.conn_per_s if stunnel.conn_per_s else 0.0
        if busy_ms and wall_ms > MAX_IDLE_FACTOR * busy_ms:
            warnings.append(
                f"a sequential stunnel connection took {wall_ms:.2f} ms but only "
                f"{busy_ms:.2f} ms of CPU (stunnel and the load): something other than CPU "
                "stalls the baseline (logging, delayed ACKs) or the machine is overloaded"
            )
        if stunnel.p99_ms > max(
            STALL_P99_FACTOR * stunnel.p50_ms, stunnel.p50_ms + STALL_P99_EXTRA_MS
        ):
            warnings.append(
                f"stunnel's sequential p99 ({stunnel.p99_ms:.1f} ms) is far above its p50 "
                f"({stunnel.p50_ms:.1f} ms): multi-millisecond stalls in the baseline (or an "
                "overloaded machine)"
            )
    warnings += _load_busy(
        [r for r in results if r.concurrency == 1],
        lambda r: r.load_cpu_ms_per_conn * r.conn_per_s / 1000,
    )
    return warnings


def throughput_warnings(results: Sequence[ThroughputResult]) -> list[str]:
    """What looks wrong with the baseline (or the load) in a throughput run."""
    warnings = []
    level = lambda r: r.streams  # noqa: E731 - a key, used twice
    stunnel, direct = _lowest(results, STUNNEL, level), _lowest(results, DIRECT, level)
    if (
        stunnel is not None
        and direct is not None
        and stunnel.streams == direct.streams
        and stunnel.gbit_s < MIN_STUNNEL_GBIT_SHARE * direct.gbit_s
    ):
        warnings.append(
            f"stunnel's {stunnel.streams}-stream rate ({stunnel.gbit_s:.2f} Gbit/s) is below "
            f"{MIN_STUNNEL_GBIT_SHARE:.0%} of the direct path's ({direct.gbit_s:.2f} Gbit/s): "
            "the baseline looks broken"
        )
    warnings += _load_busy(
        [r for r in results if r.streams == 1], lambda r: r.load_cpu_s_per_gb * r.gbit_s / 8
    )
    return warnings


def _load_busy(results: Sequence[Result], busy_share: Callable[[Result], float]) -> list[str]:
    """Tunnel rows (one client) whose generator and backend were busy most of the run."""
    return [
        f"{r.path}: the load generator and backend were busy {busy_share(r):.0%} of the "
        "single-client run: the figure may be limited by the load, not the tunnel"
        for r in results
        if r.path != DIRECT and busy_share(r) >= LOAD_BUSY_SHARE
    ]
