"""What a new tunnelled connection costs: CPU time or instructions per connection.

Figures that survive a loaded machine (docs/PERFORMANCE.md, "Connection cost"):

    python perf/connection_cost.py inproc [N]            # in-process handshakes, both sides
    python perf/connection_cost.py daemons [N] [C]       # daemon pair, /proc CPU time
    python perf/connection_cost.py callgrind [N]         # daemon pair under callgrind
    python perf/connection_cost.py profile [N] [C]       # daemon pair under cProfile (CPU time)

Add ``--tlslite`` to ``inproc`` to measure the tlslite engine instead of the native one.
Add ``--mux`` to any daemon mode to carry the connections as streams of a multiplexed
tunnel (``qkdproxy-mux``) instead of one handshake each.

``inproc`` runs ``bench handshake``'s loop (handshake, FIN, close) and reports process CPU
per handshake. ``daemons`` starts the KME simulator and a client/server daemon pair
(qkd_mlkem768, client flow, prefetch on), makes N connections (connect, one byte echoed,
close; C at a time) from this process and reads both daemons' utime+stime and the KME
simulator's (apart: the KME calls' cost on the KME's side, which shares the machine), and
from their /metrics how the server found each key (in memory, after waiting for the fetch
of an announced id, or fetched on demand) and the KME calls per connection. ``callgrind``
runs the daemons under valgrind and counts the user-space instructions of N sequential
connections (``callgrind_control --dump`` before and after); slow (minutes), but the
count does not move with the machine's load. The load generator and the echo backend run
in this process, outside the measured daemons.
"""

from __future__ import annotations

import asyncio
import glob
import os
import resource
import statistics
import sys
import tempfile
import time
from contextlib import AsyncExitStack

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from qkdproxy.core.tls.engine import DEFAULT_ENGINE
from qkdproxy.core.tls.keyexchange import Flow
from qkdproxy.tools.bench import processes
from qkdproxy.tools.bench.handshake import run_handshake_bench

TICKS = os.sysconf("SC_CLK_TCK")
WARMUP = 20


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def inproc(count: int, engine: str) -> None:
    """CPU ms per in-process handshake (client and server in this process)."""
    asyncio.run(run_handshake_bench(["qkd_mlkem768"], Flow.CLIENT_INITIATED, 10, None, engine))
    rounds = []
    for _ in range(5):
        started = _own_cpu()
        asyncio.run(
            run_handshake_bench(["qkd_mlkem768"], Flow.CLIENT_INITIATED, count, None, engine)
        )
        rounds.append(1000 * (_own_cpu() - started) / (count + 5))  # the bench warms up 5
    print(
        f"in-process handshake + close, both sides, {engine}: {min(rounds):.2f} ms CPU "
        f"(median {statistics.median(rounds):.2f}) over 5 x {count}"
    )


def _daemons() -> dict[str, int]:
    """Our child daemons by config name (client/server), found through /proc."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as stat:
                parent = stat.read().rsplit(") ", 1)[1].split()[1]
            with open(f"/proc/{pid}/cmdline") as cmdline:
                args = cmdline.read().split("\0")
        except OSError:
            continue
        if parent == str(os.getpid()) and "--config" in args:
            name = os.path.basename(args[args.index("--config") + 1]).split(".")[0]
            found[name] = int(pid)
    return found


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(") ", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


async def _connection(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"x")
    await writer.drain()
    if await reader.readexactly(1) != b"x":
        raise RuntimeError("the tunnel changed a byte")
    writer.close()
    await writer.wait_closed()


async def _connections(port: int, count: int, concurrency: int) -> None:
    slots = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with slots:
            await _connection(port)

    await asyncio.gather(*(one() for _ in range(count)))


async def daemons(
    count: int, concurrency: int, callgrind: str | None = None, *, mux: bool = False
) -> None:
    """Per-connection CPU (or instructions) of each daemon of a tunnel pair."""
    async with processes.workspace(_echo) as work:
        clients = (processes.ClientTunnel("bench", multiplex=mux),)
        pair = await processes.start_daemon_pair(
            work.stack, work.base, work.backend_port, clients=clients, status=True
        )
        port = next(iter(pair.ports.values()))
        pids = _daemons()
        for _ in range(WARMUP):
            await _connection(port)
        if callgrind is not None:
            await _instructions(pids, port, count, callgrind)
            return
        before = {name: _cpu_s(pid) for name, pid in pids.items()}
        kme_before = _cpu_s(pair.kme_pid)
        counted = await _key_counters(pair.status_ports)
        started = time.perf_counter()
        await _connections(port, count, concurrency)
        wall = time.perf_counter() - started
        after = {name: _cpu_s(pid) for name, pid in pids.items()}
        await asyncio.sleep(0.2)  # the server's announced-key fetches of the last connections
        # The simulator's CPU includes those fetches (they are the connections' KME calls).
        kme_per = 1000 * (_cpu_s(pair.kme_pid) - kme_before) / count
        keys = await _key_counters(pair.status_ports)
        keys = {name: keys[name] - counted.get(name, 0.0) for name in keys}
        total = 0.0
        for name in sorted(pids):
            per = 1000 * (after[name] - before[name]) / count
            total += per
            print(f"{name}: {per:.2f} ms CPU per connection")
        print(f"both: {total:.2f} ms; {count / wall:.0f} conn/s at concurrency {concurrency}")
        print(f"kme: {kme_per:.2f} ms CPU per connection; both + kme {total + kme_per:.2f} ms")
        _print_keys(keys, count)
        await asyncio.sleep(0.5)  # the client's last connection lines
        records = pair.client_records[-count:]
        handshakes = [float(str(r["handshake_ms"])) for r in records if r.get("handshake_ms")]
        if handshakes:
            print(f"client handshake_ms p50 {statistics.median(handshakes):.2f}")


async def _key_counters(ports: dict[str, int]) -> dict[str, float]:
    """Prefetch outcomes and KME calls of each daemon, from its /metrics
    (``server.served_from_cache``, ``client.enc_keys``, ...)."""
    out: dict[str, float] = {}
    async with aiohttp.ClientSession() as session:
        for daemon, port in ports.items():
            async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
                text = await response.text()
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name == "qkdproxy_qkd_prefetch_keys_total":
                        label = sample.labels["outcome"]
                    elif sample.name == "qkdproxy_kme_request_duration_seconds_count":
                        label = sample.labels["call"]
                    else:
                        continue
                    key = f"{daemon}.{label}"
                    out[key] = out.get(key, 0.0) + sample.value
    return out


def _print_keys(keys: dict[str, float], count: int) -> None:
    """How the server found the keys of ``count`` connections, and the KME calls."""
    waited = keys.get("server.served_after_wait", 0.0)
    ready = keys.get("server.served_from_cache", 0.0) - waited
    unannounced = keys.get("server.fetched_unannounced", 0.0)
    print(
        f"server keys: {100 * ready / count:.1f} % in memory, {100 * waited / count:.1f} % "
        f"after waiting for their fetch, {100 * unannounced / count:.1f} % not announced; "
        f"KME calls per connection: client enc_keys {keys.get('client.enc_keys', 0) / count:.2f}, "
        f"server dec_keys {keys.get('server.dec_keys', 0) / count:.2f}"
    )


async def _instructions(pids: dict[str, int], port: int, count: int, out: str) -> None:
    await asyncio.sleep(1)
    for pid in pids.values():
        await _dump(pid)  # counting starts from zero after a dump
    for _ in range(count):
        await _connection(port)
    await asyncio.sleep(1)
    for name, pid in sorted(pids.items()):
        await _dump(pid)
        print(f"{name}: {_last_total(out, name, pid) / count / 1e6:.2f} M instructions per conn")


async def _dump(pid: int) -> None:
    control = await asyncio.create_subprocess_exec(
        "callgrind_control",
        "--dump",
        str(pid),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    if await control.wait() != 0:
        raise RuntimeError("callgrind_control failed")


def _last_total(out: str, name: str, pid: int) -> int:
    """Instructions in the last dump of one daemon."""
    last = max(glob.glob(f"{out}/{name}.{pid}.*"), key=lambda f: int(f.rsplit(".", 1)[1]))
    with open(last) as dump:
        return next(int(line.split()[1]) for line in dump if line.startswith("totals:"))


def _under_callgrind(out: str) -> None:
    """Make the bench helpers start the daemons under callgrind (much slower to start)."""
    spawn = processes.spawn

    async def traced(stack: AsyncExitStack, *args: str) -> asyncio.subprocess.Process:
        if "run" in args:
            name = os.path.basename(args[-1]).split(".")[0]
            args = ("valgrind", "--tool=callgrind", f"--callgrind-out-file={out}/{name}.%p", *args)
        return await spawn(stack, *args)

    processes.spawn = traced
    processes.STARTUP_TIMEOUT_S = 600.0


def _under_cprofile(out: str) -> None:
    """Make the bench helpers start the daemons under cProfile, timing CPU (not wall) time;
    each writes ``out/NAME.prof`` when it is stopped."""
    spawn = processes.spawn

    async def profiled(stack: AsyncExitStack, *args: str) -> asyncio.subprocess.Process:
        if "run" in args:
            name = os.path.basename(args[-1]).split(".")[0]
            dump = f"{out}/{name}.prof"
            code = (
                "import cProfile, signal, sys, time; from qkdproxy.cli.main import main; "
                "signal.signal(signal.SIGTERM, lambda *_: sys.exit(0)); "
                f"sys.argv = {['qkdproxy', *args[3:]]!r}; "
                "p = cProfile.Profile(time.thread_time); p.enable()\n"
                f"try: main(sys.argv[1:])\nfinally: p.disable(); p.dump_stats({dump!r})"
            )
            args = (args[0], "-c", code)
        return await spawn(stack, *args)

    processes.spawn = profiled


def main(argv: list[str]) -> None:
    """Dispatch on the mode (see the module docstring)."""
    mux = "--mux" in argv
    engine = "tlslite" if "--tlslite" in argv else DEFAULT_ENGINE
    argv = [arg for arg in argv if arg not in ("--mux", "--tlslite")]
    mode = argv[0] if argv else "daemons"
    count = int(argv[1]) if len(argv) > 1 else 300
    if mode == "inproc":
        inproc(count, engine)
    elif mode == "daemons":
        asyncio.run(daemons(count, int(argv[2]) if len(argv) > 2 else 1, mux=mux))
    elif mode == "callgrind":
        with tempfile.TemporaryDirectory(prefix="qkdproxy-callgrind-") as out:
            _under_callgrind(out)
            asyncio.run(daemons(count, 1, callgrind=out, mux=mux))
    elif mode == "profile":
        out = tempfile.mkdtemp(prefix="qkdproxy-profile-")
        _under_cprofile(out)
        asyncio.run(daemons(count, int(argv[2]) if len(argv) > 2 else 1, mux=mux))
        print(f"profiles: {out}/client.prof, {out}/server.prof (pstats)")
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
