"""``qkdproxy bench throughput`` and ``bench connrate``: the tunnel against what users would
run instead, measured in the same run.

Paths: ``direct`` (loopback, no tunnel: the ceiling), ``qkdproxy`` (a client and a server
daemon, each its own process, with the KME simulator as a third: one handshake and one QKD
key per connection), ``qkdproxy-mux`` (the same daemons, the connection carried as a stream
of a pooled multiplexed tunnel), and ``stunnel`` (a TLS 1.3 stunnel pair with the same
certificates, mutual TLS and no resumption, when stunnel is installed). ``bench connrate
--floor`` adds ``relay-floor``: two bare Python relays sharing one plain TCP link
(:mod:`relay_floor`), the most any multiplexing design in Python could reach here.

The load generator and the backend are separate processes (:mod:`loadgen`: iperf3 or our C
programs; the Python fallback runs in this process and says so). Every path's cost is the
CPU time its tunnel processes used during the measurement (:mod:`proctime`); the KME
simulator's and the load's are reported apart.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from collections.abc import AsyncIterator, Awaitable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Generic, TypeVar

from qkdproxy.tools.bench import aes_speed, proctime
from qkdproxy.tools.bench.interpreter import interpreter_note
from qkdproxy.tools.bench.loadgen import (
    DESCRIPTIONS,
    PYTHON_LIMITED,
    Load,
    LoadUnavailableError,
    Purpose,
    choose,
    start_load,
)
from qkdproxy.tools.bench.names import Generator
from qkdproxy.tools.bench.pathstats import (
    DIRECT,
    GB,
    RELAY_FLOOR,
    STUNNEL,
    ConnrateResult,
    ThroughputResult,
    combine_rounds,
    connrate_ratios,
    connrate_warnings,
    machine_note,
    throughput_ratios,
    throughput_warnings,
)
from qkdproxy.tools.bench.processes import (
    ClientTunnel,
    discard,
    follow,
    free_port,
    scratch,
    spawn,
    start_daemon_pair,
    wait_line,
)
from qkdproxy.tools.bench.proctime import ProcessGroup

# The client daemon's tunnel behind each qkdproxy path.
PATH_TUNNELS = {"qkdproxy": "bench", "qkdproxy-mux": "mux"}
LOG_SETTLE_S = 0.5
# Idle connections settle (their lines logged) before memory is read.
IDLE_SETTLE_S = 0.25
WARM_UP_CONNECTIONS = 5
WARM_UP_BYTES = 256 * 1024
STUNNEL_MISSING = "stunnel not installed: the stunnel path is skipped (no ratios to stunnel)"
FLOOR_NOTE = (
    "relay-floor: two bare Python relays on one plain TCP link (no TLS, QKD, flow control, "
    "logging or checks): the most a multiplexing design in Python could reach on this machine"
)

T = TypeVar("T")
R = TypeVar("R", ConnrateResult, ThroughputResult)


@dataclass(frozen=True, slots=True)
class PathReport(Generic[R]):
    """Results of one run, the notes a reader needs, and what looks wrong."""

    results: list[R]
    notes: list[str]
    warnings: list[str]


@dataclass(slots=True)
class Paths:
    """Where each path's client side listens, and its processes, by path name."""

    ports: dict[str, int]
    # The tunnel processes (both ends) of each path; direct has none.
    tunnels: dict[str, ProcessGroup]
    kme: ProcessGroup
    load: Load
    # The client daemon's connection lines (JSON), for key counts.
    records: list[dict[str, object]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def keys_between(self, path: str, start: int, end: int) -> set[object] | None:
        """The QKD key ids the path's connections used, logged from record ``start`` to
        ``end``; None for a path without QKD."""
        tunnel = PATH_TUNNELS.get(path)
        if tunnel is None:
            return None
        return {
            r.get("qkd_key_id") for r in self.records[start:end]
            if r.get("tunnel") == tunnel and r.get("qkd_key_id")
        }  # fmt: skip


@dataclass(frozen=True, slots=True)
class Cost:
    """CPU seconds spent during one measurement (None: the path has no such process)."""

    tunnel: float | None
    kme: float | None


async def _metered(paths: Paths, path: str, run: Awaitable[T]) -> tuple[T, Cost]:
    """``run``, and the CPU time the path's tunnel processes and the KME spent meanwhile."""
    groups = (paths.tunnels.get(path), paths.kme if path in PATH_TUNNELS else None)
    before = [group.cpu_seconds() if group else 0.0 for group in groups]
    result = await run
    spent = [
        group.cpu_seconds() - start if group else None
        for group, start in zip(groups, before, strict=True)
    ]
    return result, Cost(*spent)


async def start_stunnel(
    stack: AsyncExitStack, base: Path, backend: int
) -> tuple[int, ProcessGroup] | None:
    """A stunnel TLS 1.3 pair in front of ``backend`` (mutual TLS, no resumption, the
    development PKI in ``base/pki``): the client end's port and both processes; None
    without stunnel."""
    binary = shutil.which("stunnel4") or shutil.which("stunnel")
    if binary is None:
        return None
    pki = base / "pki"
    server_port, client_port = free_port(), free_port()
    # asyncio sets TCP_NODELAY on every socket; stunnel must too, or delayed ACKs dominate.
    # syslog = no: with syslog on and no /dev/log, stunnel stalls on every log line (the
    # baseline looked 3-4x slower than it is). No resumption on either end, like ours.
    common = (
        "foreground = yes\npid =\ndebug = 5\nsyslog = no\nsslVersionMin = TLSv1.3\n"
        "socket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n"
    )
    server = common + (
        f"[server]\naccept = 127.0.0.1:{server_port}\nconnect = 127.0.0.1:{backend}\n"
        f"cert = {pki}/tunnel-server.pem\nkey = {pki}/tunnel-server-key.pem\n"
        f"CAfile = {pki}/ca.pem\nverifyChain = yes\noptions = NO_TICKET\nsessionCacheSize = 1\n"
    )
    client = common + (
        f"[client]\nclient = yes\naccept = 127.0.0.1:{client_port}\n"
        f"connect = 127.0.0.1:{server_port}\ncert = {pki}/tunnel-client.pem\n"
        f"key = {pki}/tunnel-client-key.pem\nCAfile = {pki}/ca.pem\nverifyChain = yes\n"
        "checkHost = server.qkdproxy.test\nsessionResume = no\n"
    )
    pids = []
    for name, text in (("stunnel-server.conf", server), ("stunnel-client.conf", client)):
        (base / name).write_text(text)
        process = await spawn(stack, binary, str(base / name))
        assert process.stderr is not None
        await wait_line(process.stderr, b"Configuration successful")
        follow(stack, process.stderr, discard)
        pids.append(process.pid)
    return client_port, ProcessGroup(tuple(pids))


async def _relay_floor(stack: AsyncExitStack, backend: int) -> tuple[int, ProcessGroup]:
    """The two bare relays of :mod:`relay_floor`; the client relay's port."""
    server_port, client_port = free_port(), free_port()
    pids = []
    for role, listen, target in (
        ("server", server_port, backend),
        ("client", client_port, server_port),
    ):
        process = await spawn(
            stack, sys.executable, "-m", "qkdproxy.tools.bench.relay_floor", role, str(listen),
            str(target),
        )  # fmt: skip
        assert process.stdout is not None
        await wait_line(process.stdout, b"ready")
        pids.append(process.pid)
    return client_port, ProcessGroup(tuple(pids))


def _start_notes() -> list[str]:
    """Checked before anything starts; the load average before our own processes add to it."""
    if not proctime.available():
        raise LoadUnavailableError("CPU accounting reads /proc: these benches need Linux")
    note = machine_note(os.getloadavg()[0], os.cpu_count() or 1)
    return [interpreter_note(), *([note] if note else [])]


@asynccontextmanager
async def _paths(
    generator: Generator,
    purpose: Purpose,
    with_stunnel: bool,
    tls_engine: str | None = None,
    with_floor: bool = False,
) -> AsyncIterator[Paths]:
    notes = _start_notes()
    choice = choose(generator, purpose)
    notes += choice.notes
    async with scratch() as (base, stack):
        load = await start_load(stack, choice, purpose)
        notes.insert(0, DESCRIPTIONS[load.kind])
        ports = {DIRECT: load.backend_port}
        tunnels: dict[str, ProcessGroup] = {}
        clients = (ClientTunnel("bench"), ClientTunnel("mux", multiplex=True))
        pair = await start_daemon_pair(
            stack, base, load.backend_port, clients=clients, tls_engine=tls_engine
        )
        if tls_engine:
            notes.append(f"qkdproxy tunnels ran the {tls_engine} TLS handshake engine")
        daemons = ProcessGroup(tuple(pair.daemon_pids))
        for path, tunnel in PATH_TUNNELS.items():
            ports[path], tunnels[path] = pair.ports[tunnel], daemons
        if with_stunnel:
            if found := await start_stunnel(stack, base, load.backend_port):
                ports[STUNNEL], tunnels[STUNNEL] = found
            else:
                notes.append(STUNNEL_MISSING)
        if with_floor:
            ports[RELAY_FLOOR], tunnels[RELAY_FLOOR] = await _relay_floor(stack, load.backend_port)
            notes.append(FLOOR_NOTE)
        yield Paths(ports, tunnels, ProcessGroup((pair.kme_pid,)), load, pair.client_records, notes)


def _python_limited(paths: Paths) -> list[str]:
    return [PYTHON_LIMITED] if paths.load.kind is Generator.PYTHON else []


def _per(value: float | None, count: float, scale: float) -> float | None:
    return None if value is None or not count else value / count * scale


async def run_throughput(
    megabytes: int,
    streams: tuple[int, ...],
    with_stunnel: bool = True,
    generator: Generator = Generator.AUTO,
    tls_engine: str | None = None,
    *,
    equal_aes: bool = False,
) -> PathReport[ThroughputResult]:
    """Bulk one-way transfer per path and stream count (same run, same machine); with
    ``equal_aes`` every process runs AES-GCM on the same instructions (:mod:`aes_speed`)."""
    with aes_speed.equal_aes(equal_aes):
        report = await _throughput(megabytes, streams, with_stunnel, generator, tls_engine)
        masked = aes_speed.CAP_VARIABLE in os.environ
        note, warning = aes_speed.describe(await aes_speed.measure(), masked)
    report.notes.append(note)
    if warning is not None and with_stunnel:
        report.warnings.append(warning)
    return report


async def _throughput(
    megabytes: int,
    streams: tuple[int, ...],
    with_stunnel: bool,
    generator: Generator,
    tls_engine: str | None,
) -> PathReport[ThroughputResult]:
    results = []
    tails: list[float] = []
    async with _paths(generator, Purpose.SINK, with_stunnel, tls_engine) as paths:
        kind = paths.load.kind.value
        for path, port in paths.ports.items():
            await paths.load.bulk(port, WARM_UP_BYTES, 1)  # first handshake, caches
            for count in streams:
                size = megabytes * 1024 * 1024
                run, cost = await _metered(paths, path, paths.load.bulk(port, size, count))
                if not run.bytes:
                    raise RuntimeError(
                        "iperf3's receiver counted no bytes (it stops when the sender is "
                        "done, and the data was still in the tunnel): use more --megabytes"
                    )
                if run.sent > run.bytes:
                    tails.append(1 - run.bytes / run.sent)
                results.append(ThroughputResult(
                    path, count, run.bytes * 8 / run.seconds / 1e9, run.bytes, run.seconds,
                    cpu_s_per_gb=_per(cost.tunnel, run.bytes, GB),
                    kme_cpu_s_per_gb=_per(cost.kme, run.bytes, GB),
                    load_cpu_s_per_gb=run.load_cpu_s / run.bytes * GB, generator=kind,
                ))  # fmt: skip
        notes = paths.notes
    if uncounted := max(tails, default=0.0):
        notes.append(
            f"iperf3's receiver stops counting when the sender is done: up to {uncounted:.1%} "
            "of the bytes sent were still in a tunnel and not counted, so CPU per GB may be "
            "over-stated by that share (--generator c counts end to end)"
        )
    results = throughput_ratios(results)
    return PathReport(results, notes, _python_limited(paths) + throughput_warnings(results))


async def _idle_kib(paths: Paths, path: str, count: int) -> float:
    """Resident memory of the path's tunnel processes per idle open connection."""
    tunnel = paths.tunnels[path]
    before = tunnel.rss_kib()
    async with paths.load.hold(paths.ports[path], count):
        await asyncio.sleep(IDLE_SETTLE_S)
        after = tunnel.rss_kib()
    return (after - before) / count


async def run_connrate(
    connections: int,
    concurrencies: tuple[int, ...],
    with_stunnel: bool = True,
    generator: Generator = Generator.AUTO,
    idle: int = 200,
    *,
    tls_engine: str | None = None,
    with_floor: bool = False,
    rounds: int = 1,
) -> PathReport[ConnrateResult]:
    """New connections per second (open, one byte each way, close) per path; then, with
    ``idle`` connections held open, the memory each costs the tunnel processes. With
    ``rounds`` above 1 every path is measured that many times, in turn with the others,
    and each row combines its rounds (:func:`combine_rounds`)."""
    results = []
    async with _paths(generator, Purpose.ECHO, with_stunnel, tls_engine, with_floor) as paths:
        kind = paths.load.kind.value
        for port in paths.ports.values():
            await paths.load.connections(port, WARM_UP_CONNECTIONS, 1)
        await asyncio.sleep(LOG_SETTLE_S)  # the warm-ups' lines are not counted
        measured: dict[tuple[str, int], list[tuple[ConnrateResult, set[object] | None]]] = {}
        for _ in range(rounds):
            for path, port in paths.ports.items():
                for concurrency in concurrencies:
                    logged = len(paths.records)
                    batch, cost = await _metered(
                        paths, path, paths.load.connections(port, connections, concurrency)
                    )
                    await asyncio.sleep(LOG_SETTLE_S)  # the last lines reach us
                    n = batch.connections
                    row = ConnrateResult(
                        path, concurrency, n / batch.seconds, batch.p50_ms, batch.p99_ms, n,
                        cpu_ms_per_conn=_per(cost.tunnel, n, 1000),
                        kme_cpu_ms_per_conn=_per(cost.kme, n, 1000),
                        load_cpu_ms_per_conn=batch.load_cpu_s / n * 1000, generator=kind,
                    )  # fmt: skip
                    keys = paths.keys_between(path, logged, len(paths.records))
                    measured.setdefault((path, concurrency), []).append((row, keys))
        for path in paths.ports:
            kib = None
            if idle and path in paths.tunnels and path != RELAY_FLOOR:
                kib = await _idle_kib(paths, path, idle)
            for concurrency in concurrencies:
                taken = measured[path, concurrency]
                ids = [keys for _, keys in taken if keys is not None]
                used = len(set[object]().union(*ids)) if path in PATH_TUNNELS else None
                row = combine_rounds([row for row, _ in taken], used)
                results.append(replace(row, kib_per_idle_conn=kib))
        notes = paths.notes
    if idle:
        notes.append(f"kib_per_idle_conn: resident memory of both tunnel processes with {idle} "
                     "idle connections open, less before, per connection")  # fmt: skip
    results = connrate_ratios(results)
    return PathReport(results, notes, _python_limited(paths) + connrate_warnings(results))
