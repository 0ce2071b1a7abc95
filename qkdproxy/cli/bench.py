"""``qkdproxy bench ...``: the benchmarks' arguments.

Every ``qkdproxy`` command line is parsed with these, ``qkdproxy run`` included, so this module
imports no bench: a bench's handler (qkdproxy.cli.bench_run) is imported when it runs. That
keeps a daemon's start (a sidecar's, a restart's) from paying for the benches.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from qkdproxy.core.tls.engine import DEFAULT_ENGINE, ENGINES
from qkdproxy.tools.bench.names import KEY_PATTERNS, Generator


def _runs(name: str) -> Callable[[argparse.Namespace], int]:
    """The handler of bench ``name``, imported only when it runs."""

    def handler(args: argparse.Namespace) -> int:
        from qkdproxy.cli import bench_run  # noqa: PLC0415 - the benches load only to run

        return bench_run.run_bench(name, args)

    return handler


def _engine_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tls-engine", choices=ENGINES, default=None,
        help="the qkdproxy tunnels' TLS handshake engine (default: the configuration's, "
        f"{DEFAULT_ENGINE})",
    )  # fmt: skip


def _output_options(parser: argparse.ArgumentParser) -> None:
    formats = parser.add_mutually_exclusive_group()
    formats.add_argument("--json", action="store_true", help='print {"results": [...]}')
    formats.add_argument("--csv", action="store_true", help="print CSV")
    parser.add_argument("--plot", metavar="FILE.png", help="also draw the results (matplotlib)")


def add_commands(commands: Any) -> None:
    """Register ``qkdproxy bench`` and its benchmarks on the top-level subparsers."""
    bench = commands.add_parser("bench", help="run benchmarks")
    benches = bench.add_subparsers(dest="bench", required=True)
    _add_handshake(benches)
    _add_kem(benches)
    kme = benches.add_parser(
        "kme", help="ETSI 014 enc_keys requests per second against a simulator KME process"
    )
    kme.add_argument("--requests", type=int, default=10_000, help="timed requests")
    kme.add_argument("--concurrency", type=int, default=16, help="concurrent callers")
    _output_options(kme)
    kme.set_defaults(handler=_runs("kme"))
    keys = benches.add_parser(
        "keys", help="key economy of a daemon pair: keys drawn and used, yield, from memory",
        description="A KME simulator with a realistic (10 keys/s, pool 500) or fast link, at "
        "each KME latency; a client and a server daemon; connections at steady rates, as fast "
        "as they go (max), a burst then idleness, or none (idle).",
    )  # fmt: skip
    keys.add_argument("--links", default="realistic,fast", help="realistic, fast")
    keys.add_argument("--kme-latency-ms", default="0,100", help="comma-separated")
    keys.add_argument("--patterns", default=",".join(KEY_PATTERNS),
                      help="comma-separated: " + ", ".join(KEY_PATTERNS))  # fmt: skip
    keys.add_argument("--seconds", type=float, default=20.0, help="per scenario")
    keys.add_argument(
        "--modes", default="per-connection",
        help="comma-separated: per-connection, mux (streams of pooled tunnels)",
    )  # fmt: skip
    _output_options(keys)
    keys.set_defaults(handler=_runs("keys"))
    throughput = benches.add_parser(
        "throughput", help="bulk transfer through a tunnel pair, direct loopback and stunnel",
        description="Each path measured in the same run: direct loopback (ceiling), a qkdproxy "
        "client+server daemon pair (separate processes; also multiplexed), and a TLS 1.3 "
        "stunnel pair (mutual TLS, no resumption) if stunnel is installed. The load runs "
        "outside the tunnels (iperf3 or our C programs). CPU per GB is the tunnel processes' "
        "own CPU time (/proc/PID/stat) during the measurement.",
    )  # fmt: skip
    throughput.add_argument("--megabytes", type=int, default=512, help="per measurement")
    throughput.add_argument("--streams", default="1,4", help="comma-separated stream counts")
    throughput.add_argument("--no-stunnel", action="store_true", help="skip stunnel")
    throughput.add_argument(
        "--equal-aes",
        action="store_true",
        help="run every process (stunnel, the daemons) on the same AES-GCM instructions "
        "(OPENSSL_ia32cap masks AVX-512 and VAES, which the OpenSSL in cryptography's wheels "
        "uses and Debian's older system OpenSSL does not): the ratios then compare the "
        "tunnels, not their crypto libraries",
    )
    throughput.add_argument(
        "--generator", choices=[g.value for g in Generator], default="auto",
        help="load generator and backend (default auto: our C programs, else Python in this "
        "process, which limits the baselines and says so; iperf3 only on request: its "
        "receiver does not count the bytes still in a tunnel when the sender is done)",
    )  # fmt: skip
    _engine_option(throughput)
    _output_options(throughput)
    throughput.set_defaults(handler=_runs("throughput"))
    connrate = benches.add_parser(
        "connrate", help="new connections per second through each path",
        description="Each connection opens, sends one byte, gets it back and closes (a full "
        "QKD-KEM handshake through the qkdproxy pair; no session resumption on any path). "
        "The load runs outside the tunnels (our C programs). CPU per connection is the "
        "tunnel processes' own CPU time (/proc/PID/stat) during the measurement; memory per "
        "idle connection is their RSS growth with --idle connections open.",
    )  # fmt: skip
    connrate.add_argument("--connections", type=int, default=500, help="per measurement")
    connrate.add_argument("--concurrency", default="1,16", help="comma-separated levels")
    connrate.add_argument("--no-stunnel", action="store_true", help="skip stunnel")
    connrate.add_argument(
        "--generator", choices=[g.value for g in Generator if g is not Generator.IPERF3],
        default="auto",
        help="load generator and backend (default auto: our C programs, else Python in "
        "this process, which limits the baselines and says so)",
    )  # fmt: skip
    connrate.add_argument(
        "--idle", type=int, default=200,
        help="idle connections held open per tunnel path to measure memory (0: skip)",
    )  # fmt: skip
    connrate.add_argument(
        "--rounds", type=int, default=1,
        help="measure every path this many times, in turn with the others, and combine "
        "them: a machine that slows down mid-run weighs on every path alike",
    )  # fmt: skip
    connrate.add_argument(
        "--floor", action="store_true",
        help="also measure relay-floor: two bare Python relays on one plain TCP link, the "
        "most any multiplexing design in Python could reach on this machine",
    )  # fmt: skip
    _engine_option(connrate)
    _output_options(connrate)
    connrate.set_defaults(handler=_runs("connrate"))
    soak = benches.add_parser(
        "soak", help="checksummed traffic through a tunnel pair; nothing lost, nothing leaked",
        description="Concurrent clients open short and long connections through a client and "
        "a server daemon (in this process) to a checksumming echo backend, for --seconds. "
        "Exit 0 only with zero mismatches and errors, every QKD key used once, and file "
        "descriptors and tasks back to their baseline afterwards.",
    )  # fmt: skip
    soak.add_argument("--seconds", type=float, default=60.0, help="how long to start clients")
    soak.add_argument("--concurrency", type=int, default=16, help="concurrent clients")
    soak.add_argument("--seed", type=int, default=1, help="message sizes and contents")
    soak.add_argument(
        "--no-tracemalloc", action="store_true", help="faster, but only RSS for memory"
    )
    soak.add_argument(
        "--multiplex", action="store_true", help="carry connections in multiplexed tunnels"
    )
    soak.add_argument(
        "--mux-rotate-s", type=float, default=0.0,
        help="with --multiplex: rotate tunnels this often (0: the daemon's default)",
    )  # fmt: skip
    _output_options(soak)
    soak.set_defaults(handler=_runs("soak"))


def _add_handshake(benches: Any) -> None:
    handshake = benches.add_parser(
        "handshake", help="full TLS 1.3 handshakes per group (in-process, or through tunnels)",
        description="Without --tunnels: client and server endpoints in this process over "
        "loopback sockets; the first group is the baseline. With --tunnels: the paper's "
        "Table I through a real client and server daemon and the KME simulator, every "
        "group in both flows, prefetch on and off, KME latency 0 and 100 ms by default.",
    )  # fmt: skip
    handshake.add_argument(
        "--groups", help="comma-separated group names (default: every available QKD group "
        "and its PQ-only counterpart)",
    )  # fmt: skip
    handshake.add_argument("--tunnels", action="store_true", help="measure through daemons")
    handshake.add_argument(
        "--flow", choices=["client", "server", "both"],
        help="which side originates the QKD key id (default: client; both with --tunnels)",
    )  # fmt: skip
    handshake.add_argument(
        "--iterations", type=int, help="handshakes per row (default 200; 20 with --tunnels)"
    )
    handshake.add_argument(
        "--api", choices=["014", "004"],
        help="in-process mode: take keys from the KME simulator over mTLS with this ETSI API "
        "(default: an in-process link)",
    )  # fmt: skip
    handshake.add_argument(
        "--kme-latency-ms", help="comma-separated latencies the simulator adds to every KME "
        "call (default 0; 0,100 with --tunnels)",
    )  # fmt: skip
    handshake.add_argument(
        "--prefetch", choices=["on", "off", "both"],
        help="keep buffers of ready keys (default on; both with --tunnels)",
    )  # fmt: skip
    _engine_option(handshake)
    _output_options(handshake)
    handshake.set_defaults(handler=_runs("handshake"))


def _add_kem(benches: Any) -> None:
    kem = benches.add_parser(
        "kem", help="keygen/encaps/decaps per KEM, plain and QKD-KEM (paper Figs. 3, 4)",
        description="Every available QKD-KEM group's KEM, timed alone and as a QKD-KEM "
        "operation with keys from the KME simulator at each latency.",
    )  # fmt: skip
    kem.add_argument("--iterations", type=int, default=50, help="per operation")
    kem.add_argument(
        "--kme-latency-ms", default="0,100", help="comma-separated simulator latencies"
    )
    kem.add_argument(
        "--prefetch", choices=["on", "off"], default="off",
        help="key buffers ahead of use (default off, like the paper)",
    )  # fmt: skip
    _output_options(kem)
    kem.set_defaults(handler=_runs("kem"))
