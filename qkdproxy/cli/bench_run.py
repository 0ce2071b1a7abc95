"""What each ``qkdproxy bench ...`` does, once its arguments are parsed (qkdproxy.cli.bench
parses them): validation, the run, and the output.

Every bench prints a table (default), ``--json`` (``{"results": [...]}``) or ``--csv``, and
can draw ``--plot FILE.png``. Exit codes: 0 done, 2 bad arguments (or plotting unavailable).
This module imports every bench: only a bench that runs loads it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from qkdproxy.core.groups import DEFAULT_GROUPS, GroupError, GroupSpec
from qkdproxy.core.hybrid import GroupUnavailableError, resolve
from qkdproxy.core.kem import default_registry
from qkdproxy.core.tls.engine import DEFAULT_ENGINE
from qkdproxy.core.tls.keyexchange import Flow, KeyApi
from qkdproxy.io.aio import run
from qkdproxy.tools.bench import kem as kem_bench
from qkdproxy.tools.bench import keys as key_bench
from qkdproxy.tools.bench import tunnel_handshake
from qkdproxy.tools.bench.handshake import KeySourceChoice, run_handshake_bench
from qkdproxy.tools.bench.kme import run_kme_bench
from qkdproxy.tools.bench.loadgen import LoadUnavailableError
from qkdproxy.tools.bench.names import KEY_MODES, KEY_PATTERNS, Generator
from qkdproxy.tools.bench.output import OutputFormat, Row, progress, render
from qkdproxy.tools.bench.pathtables import (
    CONNRATE_TABLES,
    THROUGHPUT_TABLES,
    Table,
    report_text,
)
from qkdproxy.tools.bench.plot import BarChart, PlotUnavailableError, require_matplotlib, save
from qkdproxy.tools.bench.soak import SoakProgress, SoakResult, SoakSettings, run_soak
from qkdproxy.tools.bench.tunnels import PathReport, R, run_connrate, run_throughput

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
# The bench daemons' max_connections (processes.BENCH_MAX_CONNECTIONS), less headroom.
MAX_IDLE = 4000
# Each round measures every path once more: ten are enough to smooth a noisy machine.
MAX_ROUNDS = 10


class UsageError(Exception):
    """Bad arguments: printed as ``qkdproxy bench NAME: message`` with exit code 2."""


def _floats(text: str, what: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"{what} takes comma-separated numbers") from None
    if any(v < 0 for v in values):
        raise UsageError(f"{what} must not be negative")
    return values


def _counts(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"{what} takes comma-separated whole numbers") from None
    if not values or any(v < 1 for v in values):
        raise UsageError(f"{what} values must be at least 1")
    return values


def _at_least_one(value: int, what: str) -> int:
    if value < 1:
        raise UsageError(f"{what} must be at least 1")
    return value


def _format(args: argparse.Namespace) -> OutputFormat:
    if args.json:
        return OutputFormat.JSON
    return OutputFormat.CSV if args.csv else OutputFormat.TABLE


def _emit(
    args: argparse.Namespace,
    rows: Sequence[Row],
    panels: Callable[[], list[BarChart]],
    title: str,
    footer: str = "",
    *,
    first: Sequence[str] = (),
) -> int:
    # Results first: a plot that cannot be written must not cost a long run's figures.
    print(render(rows, _format(args), title, footer, first), flush=True)
    if args.plot:
        _save_plot(panels(), args.plot)
    return EXIT_OK


def _save_plot(panels: list[BarChart], path: str) -> None:
    try:
        save(panels, Path(path))
    except OSError as exc:
        raise UsageError(f"cannot write the plot: {exc}") from None


# ------------------------------------------------------------------------- handshake


def _group_list(text: str | None) -> list[GroupSpec]:
    if not text:
        return tunnel_handshake.table_groups()
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UsageError("--groups is empty")
    return [DEFAULT_GROUPS.by_name(name) for name in names]


def _choices(value: str | None, default: str, both: Sequence[str]) -> list[str]:
    value = value or default
    return list(both) if value == "both" else [value]


def _handshake(args: argparse.Namespace) -> int:
    default_iterations = 20 if args.tunnels else 200
    iterations = _at_least_one(
        default_iterations if args.iterations is None else args.iterations, "--iterations"
    )
    groups = _group_list(args.groups)
    mode_default = "both" if args.tunnels else None
    flows = _choices(args.flow, mode_default or "client", ("client", "server"))
    prefetch = [p == "on" for p in _choices(args.prefetch, mode_default or "on", ("on", "off"))]
    latencies = _floats(args.kme_latency_ms or ("0,100" if args.tunnels else "0"),
                        "--kme-latency-ms")  # fmt: skip
    if args.tunnels:
        # A QKD group's ratio_to_pq needs its PQ-only counterpart in the same run.
        groups = tunnel_handshake.with_counterparts(groups)
        for group in groups:
            resolve(group, default_registry())  # GroupUnavailableError before any process
        return _handshake_tunnels(
            args, groups, flows=flows, prefetch=prefetch, latencies=latencies, iterations=iterations
        )
    if args.api is None and (any(latencies) or not all(prefetch)):
        raise UsageError("--kme-latency-ms and --prefetch need --api (or --tunnels)")
    engine = args.tls_engine or DEFAULT_ENGINE
    rows: list[Row] = []
    for flow in flows:
        for latency in latencies:
            for ahead in prefetch:
                keys = KeySourceChoice(KeyApi(args.api) if args.api else None, latency, ahead)
                flow_value = Flow.CLIENT_INITIATED if flow == "client" else Flow.SERVER_INITIATED
                results = run(
                    run_handshake_bench(
                        [g.name for g in groups], flow_value, iterations, keys, engine
                    )
                )
                rows += [r.as_dict() for r in results]
    footer = f"in-process endpoints; first group is the baseline; keys: {rows[0]['key_source']}"
    return _emit(args, rows, lambda: _in_process_charts(rows), "TLS 1.3 handshakes", footer)


def _in_process_charts(rows: Sequence[Row]) -> list[BarChart]:
    groups = list(dict.fromkeys(str(r["group"]) for r in rows))
    series: dict[str, list[float | None]] = {}
    for row in rows:
        ahead = "on" if row["prefetch"] else "off"
        label = f"{row['flow']} flow, KME {row['kme_latency_ms']} ms, prefetch {ahead}"
        series.setdefault(label, [None] * len(groups))
        series[label][groups.index(str(row["group"]))] = float(row["median_ms"])  # type: ignore[arg-type]
    return [BarChart("TLS 1.3 handshake, in-process endpoints (median)", "ms", groups, series)]


def _handshake_tunnels(
    args: argparse.Namespace,
    groups: list[GroupSpec],
    *,
    flows: list[str],
    prefetch: list[bool],
    latencies: tuple[float, ...],
    iterations: int,
) -> int:
    if args.api not in (None, "014"):
        raise UsageError("--tunnels measures ETSI 014 KMEs (the server-initiated flow needs it)")
    scenarios = [
        tunnel_handshake.Scenario(lat, ahead, args.tls_engine)
        for lat in latencies
        for ahead in prefetch
    ]
    total = len(scenarios) * tunnel_handshake.tunnel_count(groups, flows)
    with progress("handshakes through tunnels", total) as advance:
        results = run(
            tunnel_handshake.run_tunnel_handshake_bench(
                groups, flows, scenarios, iterations, advance
            )
        )
    footer = (
        f"{iterations} connections per row through a client and a server daemon and the KME "
        "simulator (three processes); ratio_to_pq: median over the PQ-only group's median"
    )
    return _emit(
        args, [r.as_dict() for r in results], lambda: tunnel_handshake.charts(results),
        "TLS 1.3 handshakes through qkdproxy tunnels (the paper's Table I)", footer,
        first=tunnel_handshake.TABLE_COLUMNS,
    )  # fmt: skip


# ----------------------------------------------------------------------------- kem


def _kem(args: argparse.Namespace) -> int:
    iterations = _at_least_one(args.iterations, "--iterations")
    latencies = _floats(args.kme_latency_ms, "--kme-latency-ms")
    kems = kem_bench.qkd_kem_groups()
    with progress("KEM operations", len(kems) * len(latencies)) as advance:
        results = run(
            kem_bench.run_kem_bench(iterations, latencies, args.prefetch == "on", advance)
        )
    footer = (
        "QKD-KEM: client-initiated flow, keys from the KME simulator over ETSI 014 mTLS; "
        f"prefetch {args.prefetch}"
    )
    return _emit(
        args, [r.as_dict() for r in results], lambda: kem_bench.charts(results),
        "KEM operations, plain and QKD-KEM (the paper's Figs. 3 and 4)", footer,
    )  # fmt: skip


# ------------------------------------------------------------------- tunnels, kme


def _generator(args: argparse.Namespace) -> Generator:
    return Generator(args.generator)


def _throughput(args: argparse.Namespace) -> int:
    streams = _counts(args.streams, "--streams")
    megabytes = _at_least_one(args.megabytes, "--megabytes")
    report = _run_paths(
        run_throughput(
            megabytes, streams, not args.no_stunnel, _generator(args), args.tls_engine,
            equal_aes=args.equal_aes,
        )
    )  # fmt: skip
    return _emit_paths(args, report, THROUGHPUT_TABLES, "streams", (
        ("gbit_s", "Gbit/s"), ("cpu_s_per_gb", "tunnel CPU s per GB"),
    ))  # fmt: skip


def _connrate(args: argparse.Namespace) -> int:
    levels = _counts(args.concurrency, "--concurrency")
    connections = _at_least_one(args.connections, "--connections")
    if connections < max(levels):
        raise UsageError("--connections must be at least the highest --concurrency")
    if not 0 <= args.idle <= MAX_IDLE:
        raise UsageError(f"--idle takes 0 to {MAX_IDLE} (the bench tunnels' connection limit)")
    if not 1 <= args.rounds <= MAX_ROUNDS:
        raise UsageError(f"--rounds takes 1 to {MAX_ROUNDS}")
    report = _run_paths(
        run_connrate(
            connections,
            levels,
            not args.no_stunnel,
            _generator(args),
            args.idle,
            tls_engine=args.tls_engine,
            with_floor=args.floor,
            rounds=args.rounds,
        )
    )
    return _emit_paths(args, report, CONNRATE_TABLES, "concurrency", (
        ("conn_per_s", "connections/s"), ("cpu_ms_per_conn", "tunnel CPU ms per connection"),
    ))  # fmt: skip


def _run_paths(bench: Coroutine[Any, Any, PathReport[R]]) -> PathReport[R]:
    try:
        return run(bench)
    except LoadUnavailableError as exc:
        raise UsageError(str(exc)) from None


def _emit_paths(
    args: argparse.Namespace,
    report: PathReport[R],
    tables: Sequence[Table],
    level: str,
    charts: Sequence[tuple[str, str]],
) -> int:
    fmt = _format(args)
    print(report_text(report, fmt, tables), flush=True)
    if fmt is not OutputFormat.TABLE:
        # Loud even when stdout goes to a tool: a broken baseline must not pass unseen.
        for warning in report.warnings:
            print(f"WARNING: {warning}", file=sys.stderr)
    if args.plot:
        rows = [r.as_dict() for r in report.results]
        _save_plot([_path_chart(rows, level, value, unit) for value, unit in charts], args.plot)
    return EXIT_OK


def _path_chart(rows: Sequence[Row], level: str, value: str, unit: str) -> BarChart:
    levels = list(dict.fromkeys(str(r[level]) for r in rows))
    paths = list(dict.fromkeys(str(r["path"]) for r in rows))
    by_key = {(str(r["path"]), str(r[level])): _number(r[value]) for r in rows}
    series = {path: [by_key.get((path, lv)) for lv in levels] for path in paths}
    return BarChart(f"{unit} by {level}", unit, [f"{level} {lv}" for lv in levels], series)


def _soak(args: argparse.Namespace) -> int:
    if args.seconds < 0:
        raise UsageError("--seconds must not be negative")
    settings = SoakSettings(
        seconds=args.seconds, concurrency=_at_least_one(args.concurrency, "--concurrency"),
        seed=args.seed, trace_memory=not args.no_tracemalloc,
        multiplex=args.multiplex, mux_rotate_s=args.mux_rotate_s,
    )  # fmt: skip
    with progress("soak", max(1, round(args.seconds))) as advance:
        done = [0]

        def on_progress(update: SoakProgress) -> None:
            elapsed = min(int(update.elapsed_s), max(1, round(args.seconds)))
            advance(elapsed - done[0])
            done[0] = elapsed

        result = run(run_soak(settings, on_progress))
    document = result.to_json()
    if _format(args) is OutputFormat.TABLE:
        print(result.format_table(), flush=True)
        if args.plot:
            _save_plot(_soak_charts(result), args.plot)
    else:
        row = document if args.json else _flatten(document)
        _emit(args, [row], lambda: _soak_charts(result), "soak")
    return EXIT_OK if result.ok else EXIT_FAILURE


def _flatten(document: dict[str, Any], prefix: str = "") -> Row:
    """Nested keys joined with dots, lists as JSON text: one CSV-ready row."""
    row: Row = {}
    for key, value in document.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            row.update(_flatten(value, f"{name}."))
        else:
            row[name] = json.dumps(value) if isinstance(value, list) else value
    return row


def _soak_charts(result: SoakResult) -> list[BarChart]:
    res = result.resources
    labels = ["file descriptors", "asyncio tasks"]
    return [
        BarChart(
            "Resources before the soak and after everything closed", "count", labels,
            {"before": [res.before.fds, res.before.tasks],
             "after": [res.after.fds, res.after.tasks]},
        )
    ]  # fmt: skip


def _kme(args: argparse.Namespace) -> int:
    requests = _at_least_one(args.requests, "--requests")
    concurrency = _at_least_one(args.concurrency, "--concurrency")
    result = run(run_kme_bench(requests, concurrency))
    row = result.as_dict()
    chart = BarChart("ETSI 014 enc_keys latency", "ms", ["median", "p99"],
                     {"simulator": [result.median_ms, result.p99_ms]})  # fmt: skip
    return _emit(args, [row], lambda: [chart], "KME simulator, single-key enc_keys")


def _keys(args: argparse.Namespace) -> int:
    links = [v for v in args.links.split(",") if v]
    patterns = [v for v in args.patterns.split(",") if v]
    if not links or any(v not in key_bench.LINKS for v in links):
        raise UsageError(f"--links takes {','.join(key_bench.LINKS)}")
    if not patterns or any(v not in KEY_PATTERNS for v in patterns):
        raise UsageError(f"--patterns takes {','.join(KEY_PATTERNS)}")
    if args.seconds <= 0:
        raise UsageError("--seconds must be positive")
    modes = [v for v in args.modes.split(",") if v]
    if not modes or any(v not in KEY_MODES for v in modes):
        raise UsageError(f"--modes takes {','.join(KEY_MODES)}")
    latencies = _floats(args.kme_latency_ms, "--kme-latency-ms")
    chosen = key_bench.scenarios(links, latencies, patterns, args.seconds, modes)
    with progress("keys", len(chosen)) as advance:
        results = run(key_bench.run_key_bench(chosen, advance))
    rows = [r.as_dict() for r in results]

    def charts() -> list[BarChart]:
        labels = [
            f"{r['link']} {r['kme_latency_ms']:g} ms {r['pattern']} {r['mode']}" for r in rows
        ]
        return [
            BarChart("Key yield (consumed / settled)", "yield", labels,
                     {"yield": [_number(r["yield"]) for r in rows]}),
            BarChart("Handshakes served from memory", "share", labels,
                     {"from memory": [_number(r["from_memory"]) for r in rows]}),
        ]  # fmt: skip

    return _emit(
        args, rows, charts, "Key economy: keys drawn by the client daemon and their use",
        "yield = consumed / (drawn - held at the end); from_memory = handshakes whose key was "
        "in the client's supply",
    )  # fmt: skip


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) else None


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "handshake": _handshake, "kem": _kem, "kme": _kme, "keys": _keys,
    "throughput": _throughput, "connrate": _connrate, "soak": _soak,
}  # fmt: skip


def run_bench(name: str, args: argparse.Namespace) -> int:
    """Run bench ``name``; argument and availability errors become one line on stderr and
    exit code 2."""
    try:
        if args.plot:
            require_matplotlib()
        return HANDLERS[name](args)
    except (UsageError, GroupError, GroupUnavailableError, PlotUnavailableError) as exc:
        print(f"qkdproxy bench {name}: {exc}", file=sys.stderr)
        return EXIT_USAGE
