"""Real processes for the benchmarks: the KME simulator and a client/server daemon pair.

Each runs as its own ``python -m qkdproxy`` process, as it would on its own host, with the
development PKI of ``qkdproxy certs``. Everything is torn down by the caller's exit stack.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from qkdproxy.tools.certs import write_dev_pki

STARTUP_TIMEOUT_S = 30.0
CLIENT_URI = "spiffe://qkdproxy.test/tunnel/client"
BackendHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
SERVER_NAME = "server.qkdproxy.test"


@dataclass(frozen=True, slots=True)
class Workspace:
    """A temporary directory with the development PKI, a backend, and an exit stack."""

    base: Path
    stack: AsyncExitStack
    backend_port: int


@asynccontextmanager
async def scratch() -> AsyncIterator[tuple[Path, AsyncExitStack]]:
    """A temporary directory with the development PKI in ``pki/``, and an exit stack.

    Everything a bench run starts is torn down, and its files removed, on exit."""
    with tempfile.TemporaryDirectory(prefix="qkdproxy-bench-") as tmp:
        base = Path(tmp)
        write_dev_pki(base / "pki")
        async with AsyncExitStack() as stack:
            yield base, stack


@asynccontextmanager
async def workspace(backend: BackendHandler) -> AsyncIterator[Workspace]:
    """:func:`scratch` with ``backend`` serving in this process."""
    async with scratch() as (base, stack):
        server = await asyncio.start_server(backend, "127.0.0.1", 0)
        stack.callback(server.close)
        yield Workspace(base, stack, int(server.sockets[0].getsockname()[1]))


async def spawn(stack: AsyncExitStack, *args: str) -> asyncio.subprocess.Process:
    """Start a process that is terminated (then killed) when ``stack`` closes."""
    process = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )

    async def stop() -> None:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()

    stack.push_async_callback(stop)
    return process


async def wait_line(stream: asyncio.StreamReader, marker: bytes) -> bytes:
    """The first line containing ``marker``; RuntimeError if the process exits first."""
    seen: list[bytes] = []
    async with asyncio.timeout(STARTUP_TIMEOUT_S):
        while True:
            line = await stream.readline()
            if not line:
                tail = b"".join(seen[-5:]).decode("utf-8", "replace").strip()
                raise RuntimeError(f"a benchmark process exited during start-up: {tail}")
            if marker in line:
                return line
            seen.append(line)


def follow(
    stack: AsyncExitStack, stream: asyncio.StreamReader, on_line: Callable[[bytes], None]
) -> None:
    """Hand every line a child writes to ``on_line`` while it runs, so its pipe never fills."""

    async def read() -> None:
        while line := await stream.readline():
            on_line(line)

    task = asyncio.create_task(read())
    stack.callback(task.cancel)


def discard(_line: bytes) -> None:
    """An ``on_line`` that ignores the line."""


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports that were free a moment ago.

    They come from outside the kernel's ephemeral range: a port the kernel picked (bind to
    port 0) can be handed out again as the source port of any outgoing connection before
    the process it was chosen for binds it, and a machine running daemons, a KME and their
    clients makes many (a system test's KME once failed to bind "its" port that way).
    Outside the range only another caller of this function can take it. All are held open
    until every one is chosen, so they are distinct.
    """
    spare = _outside_ephemeral_range()
    with contextlib.ExitStack() as held:
        ports: list[int] = []
        while len(ports) < count:
            port = secrets.choice(spare)
            sock = held.enter_context(socket.socket())
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:  # in use (or held by this call): another one
                continue
            ports.append(port)
        return ports


def _outside_ephemeral_range() -> range:
    """Ports the kernel does not hand out as source ports (below its ephemeral range, or
    above it when too little room is left below)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as limits:
            low, high = (int(field) for field in limits.read().split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default
    if low - 1024 >= 4096:
        return range(max(1024, low - 16384), low)
    return range(high + 1, 65536)


async def start_kme(
    stack: AsyncExitStack, pki: Path, latency_ms: float = 0.0
) -> tuple[dict[str, str], int]:
    """The KME simulator pair as a process; its ETSI 014 URLs by KME name, and its pid."""
    kme = await spawn(
        stack, sys.executable, "-m", "qkdproxy", "kme", "--pki", str(pki),
        "--latency-ms", str(latency_ms),
    )  # fmt: skip
    assert kme.stdout is not None
    assert kme.stderr is not None
    urls: dict[str, str] = json.loads(await wait_line(kme.stdout, b"{"))["kme"]
    follow(stack, kme.stderr, discard)
    return urls, kme.pid


@dataclass(frozen=True, slots=True)
class ClientTunnel:
    """One client tunnel of the pair: its name, offered groups and flow."""

    name: str
    groups: Sequence[str] = ()
    flow: str = "client-initiated"
    policy: str | None = None
    # Carry connections as streams of pooled tunnels (the server accepts both modes).
    multiplex: bool = False


@dataclass(slots=True)
class DaemonPair:
    """A running server daemon and client daemon; client tunnel ports by tunnel name."""

    ports: dict[str, int]
    # Connection records (the daemons' JSON log lines) of the client daemon, in order.
    client_records: list[dict[str, object]] = field(default_factory=list)
    # Process ids, for CPU and memory accounting: the two daemons, and the KME simulator.
    daemon_pids: list[int] = field(default_factory=list)
    kme_pid: int = 0
    # Status listener ports ("server", "client") when asked for: /metrics for key counters.
    status_ports: dict[str, int] = field(default_factory=dict)


_KME_SECTION = """
[kme.local]
url = "{url}"
sae_id = "{sae}"
peer_sae_id = "{peer}"
cert = "pki/{sae}.pem"
key = "pki/{sae}-key.pem"
ca = "pki/ca.pem"
prefetch = {prefetch}
# One trusted loopback client measures the server-initiated flow: no pre-auth limit.
preauth_keys_per_s = 1e6
preauth_keys_burst = 1e6
"""

# The benchmarks' one loopback load generator is trusted: no per-source handshake limits
# (admission control would otherwise cap a fast bench at 100 handshakes/s from one source).
BENCH_ADMISSION = "handshake_rate_per_source = 0\nmax_handshakes_per_source = 0"
# Room for the connections `bench connrate --idle` holds open (the default limit is 100).
BENCH_MAX_CONNECTIONS = 5000
# ... and, on servers, pre-authentication key budgets it never reaches.
BENCH_BUDGET = (
    "preauth_keys_per_source_per_s = 1e6\npreauth_keys_per_source_burst = 1e6\n"
    "unknown_key_ids_per_source_per_s = 1e6\nunknown_key_ids_per_source_burst = 1e6\n"
    + BENCH_ADMISSION
)

_TUNNEL = """
[[tunnel]]
name = "{name}"
role = "{role}"
listen = "127.0.0.1:{listen}"
connect = "127.0.0.1:{connect}"
cert = "pki/tunnel-{role}.pem"
key = "pki/tunnel-{role}-key.pem"
ca = "pki/ca.pem"
kme = "local"
{extra}
"""


def _toml_list(values: Sequence[str]) -> str:
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


def _client_extra(tunnel: ClientTunnel) -> str:
    lines = [
        f'server_name = "{SERVER_NAME}"', f'flow = "{tunnel.flow}"', BENCH_ADMISSION,
        f"max_connections = {BENCH_MAX_CONNECTIONS}",
    ]  # fmt: skip
    if tunnel.groups:
        lines.append(f"groups = {_toml_list(tunnel.groups)}")
    if tunnel.policy:
        lines.append(f'policy = "{tunnel.policy}"')
    if tunnel.multiplex:
        lines.append("multiplex = true")
    return "\n".join(lines)


def _record_collector(records: list[dict[str, object]]) -> Callable[[bytes], None]:
    def on_line(line: bytes) -> None:
        start = line.find(b"{")
        if start < 0:
            return
        try:
            record = json.loads(line[start:])
        except ValueError:
            return
        if isinstance(record, dict) and "conn_id" in record:
            records.append(record)

    return on_line


async def start_daemon_pair(
    stack: AsyncExitStack,
    base: Path,
    backend: int,
    *,
    clients: Sequence[ClientTunnel] = (ClientTunnel("bench"),),
    server_groups: Sequence[str] = (),
    kme_latency_ms: float = 0.0,
    prefetch: bool = True,
    tls_engine: str | None = None,
    status: bool = False,
    kme_extra: str = "",
    python: str = sys.executable,
) -> DaemonPair:
    """KME simulator, server daemon (one tunnel to ``backend``) and client daemon.

    ``base`` must hold the development PKI in ``base/pki``. The server tunnel accepts every
    group in ``server_groups`` (its policy's defaults when empty). Every tunnel runs the
    ``tls_engine`` handshake engine (the configuration's default when None). With
    ``status`` each daemon serves /metrics on a loopback port (``DaemonPair.status_ports``).
    ``kme_extra``: TOML lines added to both daemons' ``[kme]`` section. ``python``: the
    interpreter the daemons run on (one with qkdproxy installed).
    """
    engine = f'\ntls_engine = "{tls_engine}"' if tls_engine else ""
    urls, kme_pid = await start_kme(stack, base / "pki", kme_latency_ms)
    kme = {"prefetch": "true" if prefetch else "false"}
    server_port, *client_ports = free_ports(1 + len(clients))
    # The benchmarks measure both flows (the server serves both) and both modes.
    server_extra = (
        f'allow = ["uri:{CLIENT_URI}"]\nflows = ["client", "server"]\nmultiplex = true\n'
        f"max_connections = {BENCH_MAX_CONNECTIONS}\n" + BENCH_BUDGET + engine
    )
    if server_groups:
        server_extra += f'\npolicy = "pq-required"\ngroups = {_toml_list(server_groups)}'
    server = _KME_SECTION.format(url=urls["kme-b"], sae="sae-b", peer="sae-a", **kme) + kme_extra
    server += _TUNNEL.format(
        name="server", role="server", listen=server_port, connect=backend, extra=server_extra
    )
    client = _KME_SECTION.format(url=urls["kme-a"], sae="sae-a", peer="sae-b", **kme) + kme_extra
    ports = {tunnel.name: port for tunnel, port in zip(clients, client_ports, strict=True)}
    for tunnel in clients:
        client += _TUNNEL.format(
            name=tunnel.name, role="client", listen=ports[tunnel.name], connect=server_port,
            extra=_client_extra(tunnel) + engine,
        )  # fmt: skip
    pair = DaemonPair(ports, kme_pid=kme_pid)
    if status:
        pair.status_ports = dict(zip(("server", "client"), free_ports(2), strict=True))
        server = f'[status]\nlisten = "127.0.0.1:{pair.status_ports["server"]}"\n' + server
        client = f'[status]\nlisten = "127.0.0.1:{pair.status_ports["client"]}"\n' + client
    (base / "server.toml").write_text(server)
    (base / "client.toml").write_text(client)
    daemons = (
        ("server", "server", discard),
        ("client", clients[-1].name, _record_collector(pair.client_records)),
    )
    for config, last_tunnel, on_line in daemons:
        process = await spawn(
            stack, python, "-m", "qkdproxy", "run", "--config", str(base / f"{config}.toml")
        )
        assert process.stderr is not None
        pair.daemon_pids.append(process.pid)
        # Tunnels start in order: the last one listening means all of them are.
        await wait_line(process.stderr, f"tunnel {last_tunnel} (".encode())
        follow(stack, process.stderr, on_line)
    return pair
