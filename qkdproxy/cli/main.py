"""The ``qkdproxy`` command line: thin wrappers over the library."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections.abc import Sequence

from qkdproxy import __version__
from qkdproxy.cli.bench import add_commands as add_bench_commands
from qkdproxy.cli.daemon import add_commands as add_daemon_commands
from qkdproxy.cli.kme import add_commands as add_kme_commands
from qkdproxy.core.groups import DEFAULT_GROUPS, GroupError
from qkdproxy.core.hybrid import GroupUnavailableError, resolve
from qkdproxy.core.kem import default_registry
from qkdproxy.core.tls.keyexchange import Flow, KeyApi
from qkdproxy.io.aio import run
from qkdproxy.tools.demo import format_summary, run_demo
from qkdproxy.tools.kme_check import add_command as add_kme_check_command

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
    print(format_groups(rows))
    return EXIT_OK


def format_groups(rows: list[dict[str, object]]) -> str:
    """One line per group; the reason a group cannot run is written once, in a numbered note
    under the table, however many groups share it (one missing library: 22 groups)."""
    notes: dict[str, int] = {}
    lines = []
    for row in rows:
        if row["available"]:
            status = (
                f"client {row['client_share_bytes']} B, server {row['server_share_bytes']} B, "
                f"secret {row['secret_bytes']} B"
            )
        else:
            what, _, cause = str(row["reason"]).rpartition(" is not available: ")
            kem = what.split(": ", 1)[-1] if cause else ""
            number = notes.setdefault(cause or str(row["reason"]), len(notes) + 1)
            status = f"unavailable{f' ({kem})' if kem else ''} [{number}]"
        lines.append(f"{row['group']:<22} {row['code_point']}  {row['kind']:<10} {status}")
    lines += [textwrap.fill(f"[{n}] {cause}", 100, subsequent_indent="    ")
              for cause, n in notes.items()]  # fmt: skip
    return "\n".join(lines)


def _demo_command(args: argparse.Namespace) -> int:
    api = KeyApi(args.api)
    flows = {
        "client": (Flow.CLIENT_INITIATED,),
        "server": (Flow.SERVER_INITIATED,),
        "both": (Flow.CLIENT_INITIATED, Flow.SERVER_INITIATED),
    }[args.flow]
    skipped = []
    if api is KeyApi.ETSI_004 and Flow.SERVER_INITIATED in flows:
        if args.flow == "server":
            print("qkdproxy demo: the server-initiated flow needs ETSI 014", file=sys.stderr)
            return EXIT_USAGE
        flows = (Flow.CLIENT_INITIATED,)
        skipped.append("server-initiated: ETSI 004 has no server-initiated flow (use --api 014)")
    try:
        group = DEFAULT_GROUPS.by_name(args.group)
        if not group.post_quantum:
            raise GroupError(f"{group.name} is classical; the demo runs QKD or PQ groups")
        resolve(group, default_registry())
    except (GroupError, GroupUnavailableError) as exc:
        print(f"qkdproxy demo: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for note in skipped:
        print(f"qkdproxy demo: not run: {note}", file=sys.stderr)
    summary = run(run_demo(args.group, flows, api, args.kme_latency_ms))
    summary.skipped = skipped
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

    add_bench_commands(commands)
    add_kme_commands(commands)
    add_daemon_commands(commands)
    add_kme_check_command(commands)
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
