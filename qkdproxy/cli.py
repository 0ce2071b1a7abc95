"""The ``qkdproxy`` command line: thin wrappers over the library."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from qkdproxy import __version__
from qkdproxy.aio import run
from qkdproxy.bench.handshake import KeySourceChoice, format_table, run_handshake_bench
from qkdproxy.bench.kme import run_kme_bench
from qkdproxy.bench.tunnels import run_connrate, run_throughput
from qkdproxy.daemon_cli import add_commands as add_daemon_commands
from qkdproxy.demo import format_summary, run_demo
from qkdproxy.groups import DEFAULT_GROUPS, GroupError
from qkdproxy.hybrid import GroupUnavailableError, resolve
from qkdproxy.kem import default_registry
from qkdproxy.kme.cli import add_commands as add_kme_commands
from qkdproxy.tls.keyexchange import Flow, KeyApi

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def _groups_command(args: argparse.Namespace) -> int:
    registry = default_registry()
    rows: list[dict[str, object]] = []
    for group in DEFAULT_GROUPS.all():
        try:
            hybrid = resolve(group, registry)
        except GroupUnavailableError as exc:
            rows.append(
                {
                    "group": group.name,
                    "code_point": f"{group.code_point:#06x}",
                    "kind": group.kind.value,
                    "available": False,
                    "reason": str(exc),
                }
            )
            continue
        rows.append(
            {
                "group": group.name,
                "code_point": f"{group.code_point:#06x}",
                "kind": group.kind.value,
                "available": True,
                "components": list(group.components),
                "client_share_bytes": hybrid.client_share_size,
                "server_share_bytes": hybrid.server_share_size,
                "secret_bytes": hybrid.secret_size,
            }
        )
    if args.json:
        print(json.dumps({"groups": rows}, indent=2))
        return EXIT_OK
    for row in rows:
        status = (
            f"client {row['client_share_bytes']} B, server {row['server_share_bytes']} B, "
            f"secret {row['secret_bytes']} B"
            if row["available"]
            else f"unavailable: {row['reason']}"
        )
        print(f"{row['group']:<22} {row['code_point']}  {row['kind']:<10} {status}")
    return EXIT_OK


def _bench_handshake_command(args: argparse.Namespace) -> int:
    names = [n.strip() for n in args.groups.split(",") if n.strip()]
    if args.iterations < 1:
        print("qkdproxy bench handshake: --iterations must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    flow = Flow.CLIENT_INITIATED if args.flow == "client" else Flow.SERVER_INITIATED
    if args.api is None and (args.kme_latency_ms or args.prefetch == "off"):
        print("qkdproxy bench handshake: --kme-latency-ms and --prefetch need --api",
              file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    keys = KeySourceChoice(
        KeyApi(args.api) if args.api else None, args.kme_latency_ms, args.prefetch == "on"
    )
    try:
        results = run(run_handshake_bench(names, flow, args.iterations, keys))
    except (GroupError, GroupUnavailableError) as exc:
        print(f"qkdproxy bench handshake: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps({"results": [r.as_dict() for r in results]}, indent=2))
    else:
        print(format_table(results))
    return EXIT_OK


def _output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--csv", action="store_true", help="print CSV")


def _print_results(rows: list[dict[str, object]], args: argparse.Namespace) -> None:
    if args.json:
        print(json.dumps({"results": rows}, indent=2))
        return
    columns = list(rows[0]) if rows else []
    if args.csv:
        print(",".join(columns))
        for row in rows:
            print(",".join(str(row[c]) for c in columns))
        return
    cells = [[f"{row[c]:.2f}" if isinstance(row[c], float) else str(row[c]) for c in columns]
             for row in rows]  # fmt: skip
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row_cells in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row_cells, widths, strict=True)))


def _levels(text: str) -> tuple[int, ...] | None:
    try:
        levels = tuple(int(v) for v in text.split(","))
    except ValueError:
        return None
    return levels if levels and all(v >= 1 for v in levels) else None


def _bench_throughput_command(args: argparse.Namespace) -> int:
    streams = _levels(args.streams)
    if streams is None or args.megabytes < 1:
        print("qkdproxy bench throughput: bad --streams or --megabytes", file=sys.stderr)
        return EXIT_USAGE
    results = run(run_throughput(args.megabytes, streams, not args.no_stunnel))
    _print_results([r.as_dict() for r in results], args)
    return EXIT_OK


def _bench_connrate_command(args: argparse.Namespace) -> int:
    levels = _levels(args.concurrency)
    if levels is None or args.connections < 1:
        print("qkdproxy bench connrate: bad --concurrency or --connections", file=sys.stderr)
        return EXIT_USAGE
    results = run(run_connrate(args.connections, levels, not args.no_stunnel))
    _print_results([r.as_dict() for r in results], args)
    return EXIT_OK


def _bench_kme_command(args: argparse.Namespace) -> int:
    if args.requests < 1 or args.concurrency < 1:
        print("qkdproxy bench kme: --requests and --concurrency must be >= 1", file=sys.stderr)
        return EXIT_USAGE
    result = run(run_kme_bench(args.requests, args.concurrency))
    if args.json:
        print(json.dumps({"results": [result.as_dict()]}, indent=2))
    else:
        print(
            f"{result.requests} single-key enc_keys, {result.concurrency} concurrent callers: "
            f"{result.requests_per_s:.0f} requests/s, median {result.median_ms:.2f} ms, "
            f"p99 {result.p99_ms:.2f} ms"
        )
    return EXIT_OK


def _demo_command(args: argparse.Namespace) -> int:
    api = KeyApi(args.api)
    flows = {
        "client": (Flow.CLIENT_INITIATED,),
        "server": (Flow.SERVER_INITIATED,),
        "both": (Flow.CLIENT_INITIATED, Flow.SERVER_INITIATED),
    }[args.flow]
    if api is KeyApi.ETSI_004 and Flow.SERVER_INITIATED in flows:
        if args.flow == "server":
            print("qkdproxy demo: the server-initiated flow needs ETSI 014", file=sys.stderr)
            return EXIT_USAGE
        flows = (Flow.CLIENT_INITIATED,)
    try:
        DEFAULT_GROUPS.by_name(args.group)
    except GroupError as exc:
        print(f"qkdproxy demo: {exc}", file=sys.stderr)
        return EXIT_USAGE
    summary = run(run_demo(args.group, flows, api, args.kme_latency_ms))
    print(json.dumps(summary.as_dict()) if args.json else format_summary(summary))
    return EXIT_OK if summary.ok else EXIT_FAILURE


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(
        prog="qkdproxy", description="Hybrid QKD-KEM TLS 1.3 tunnel daemon."
    )
    parser.add_argument("--version", action="version", version=f"qkdproxy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    groups = commands.add_parser(
        "groups", help="list key-exchange groups and whether they run here"
    )
    groups.add_argument("--json", action="store_true", help="print JSON")
    groups.set_defaults(handler=_groups_command)

    bench = commands.add_parser("bench", help="run benchmarks")
    benches = bench.add_subparsers(dest="bench", required=True)
    handshake = benches.add_parser(
        "handshake",
        help="full TLS 1.3 handshakes over loopback per group",
        description="Full TLS 1.3 handshakes over loopback sockets with an in-process QKD link. "
        "The first group is the baseline for the ratio column.",
    )
    handshake.add_argument("--groups", required=True, help="comma-separated group names")
    handshake.add_argument(
        "--flow",
        choices=["client", "server"],
        default="client",
        help="which side originates the QKD key id (default: client)",
    )
    handshake.add_argument("--iterations", type=int, default=200, help="handshakes per group")
    handshake.add_argument(
        "--api",
        choices=["014", "004"],
        help="take keys from the KME simulator over mTLS with this ETSI API "
        "(default: an in-process link)",
    )
    handshake.add_argument(
        "--kme-latency-ms",
        type=float,
        default=0.0,
        help="latency the simulator adds to every KME call",
    )
    handshake.add_argument(
        "--prefetch",
        choices=["on", "off"],
        default="on",
        help="keep a buffer of ready keys on the master side (default on)",
    )
    handshake.add_argument("--json", action="store_true", help="print one JSON object")
    handshake.set_defaults(handler=_bench_handshake_command)
    kme = benches.add_parser(
        "kme", help="ETSI 014 enc_keys requests per second against a simulator KME process"
    )
    kme.add_argument("--requests", type=int, default=10_000, help="timed requests")
    kme.add_argument("--concurrency", type=int, default=16, help="concurrent callers")
    kme.add_argument("--json", action="store_true", help="print one JSON object")
    kme.set_defaults(handler=_bench_kme_command)
    throughput = benches.add_parser(
        "throughput", help="bulk transfer through a tunnel pair, direct loopback and stunnel",
        description="Each path measured in the same run: direct loopback (ceiling), a qkdproxy "
        "client+server daemon pair (separate processes), and a TLS 1.3 stunnel pair if "
        "stunnel is installed.",
    )  # fmt: skip
    throughput.add_argument("--megabytes", type=int, default=512, help="per measurement")
    throughput.add_argument("--streams", default="1,4", help="comma-separated stream counts")
    throughput.add_argument("--no-stunnel", action="store_true", help="skip stunnel")
    _output_options(throughput)
    throughput.set_defaults(handler=_bench_throughput_command)
    connrate = benches.add_parser(
        "connrate", help="new connections per second through each path",
        description="Each connection opens, sends one byte, gets it back and closes (a full "
        "QKD-KEM handshake through the qkdproxy pair; no session resumption).",
    )  # fmt: skip
    connrate.add_argument("--connections", type=int, default=500, help="per measurement")
    connrate.add_argument("--concurrency", default="1,16", help="comma-separated levels")
    connrate.add_argument("--no-stunnel", action="store_true", help="skip stunnel")
    _output_options(connrate)
    connrate.set_defaults(handler=_bench_connrate_command)
    add_kme_commands(commands)
    add_daemon_commands(commands)
    demo = commands.add_parser(
        "demo", help="run everything on loopback and verify real traffic (the main demo)",
        description="Starts the KME simulator pair, an echo backend, a server and a client "
        "daemon in one process; sends traffic through the tunnel in each flow; verifies every "
        "byte; prints a summary. Exit 0 only if everything worked.",
    )  # fmt: skip
    demo.add_argument("--group", default="qkd_mlkem768", help="key-exchange group")
    demo.add_argument("--flow", choices=["client", "server", "both"], default="both")
    demo.add_argument("--api", choices=["014", "004"], default="014", help="ETSI API of the KMEs")
    demo.add_argument("--kme-latency-ms", type=float, default=0.0, help="added to KME calls")
    demo.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    demo.set_defaults(handler=_demo_command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``qkdproxy`` console script."""
    args = build_parser().parse_args(argv)
    return int(args.handler(args))
