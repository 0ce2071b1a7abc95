"""``qkdproxy bench throughput`` and ``bench connrate``: the tunnel against what users would
run instead, measured in the same run.

Paths: ``direct`` (loopback, no tunnel: the ceiling), ``qkdproxy`` (a client and a server
daemon, each its own process, with the KME simulator as a third: one handshake and one QKD
key per connection), ``qkdproxy-mux`` (the same daemons, the connection carried as a stream
of a pooled multiplexed tunnel), and ``stunnel`` (a TLS 1.3 stunnel pair with the same
certificates, when stunnel is installed). The load generator and
the backends run in this process.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qkdproxy.tools.bench.processes import (
    BackendHandler,
    ClientTunnel,
    discard,
    follow,
    free_port,
    spawn,
    start_daemon_pair,
    wait_line,
    workspace,
)

CHUNK = 256 * 1024
# The client daemon's tunnel behind each qkdproxy path.
PATH_TUNNELS = {"qkdproxy": "bench", "qkdproxy-mux": "mux"}
LOG_SETTLE_S = 0.5


@dataclass(frozen=True, slots=True)
class ThroughputResult:
    """One path, one stream count."""

    path: str
    streams: int
    gbit_s: float
    bytes: int
    seconds: float

    def as_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return asdict(self)


@dataclass(frozen=True, slots=True)
class ConnrateResult:
    """New connections per second through one path."""

    path: str
    concurrency: int
    conn_per_s: float
    p50_ms: float
    p99_ms: float
    connections: int
    # QKD keys the measurement consumed (distinct key ids in the client daemon's lines);
    # None for paths without QKD.
    keys: int | None = None

    def as_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return asdict(self)


async def _sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Throughput backend: count bytes to EOF, answer with the count."""
    total = 0
    try:
        while data := await reader.read(CHUNK):
            total += len(data)
        writer.write(total.to_bytes(8, "big"))
        await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def ping_backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Connection-rate backend: echo one byte, close."""
    try:
        writer.write(await reader.readexactly(1))
        await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


@dataclass(slots=True)
class Paths:
    """Where each path's client side listens, by path name."""

    ports: dict[str, int]
    # The client daemon's connection lines (JSON), for key counts.
    records: list[dict[str, object]] = field(default_factory=list)

    def keys_since(self, path: str, start: int) -> int | None:
        """QKD keys used by the path's connections logged after record ``start``."""
        tunnel = PATH_TUNNELS.get(path)
        if tunnel is None:
            return None
        return len({
            r.get("qkd_key_id") for r in self.records[start:]
            if r.get("tunnel") == tunnel and r.get("qkd_key_id")
        })  # fmt: skip


async def _stunnel(stack: AsyncExitStack, base: Path, backend: int) -> int | None:
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
    for name, text in (("stunnel-server.conf", server), ("stunnel-client.conf", client)):
        (base / name).write_text(text)
        process = await spawn(stack, binary, str(base / name))
        assert process.stderr is not None
        await wait_line(process.stderr, b"Configuration successful")
        follow(stack, process.stderr, discard)
    return client_port


@asynccontextmanager
async def _paths(handler: BackendHandler, with_stunnel: bool) -> AsyncIterator[Paths]:
    async with workspace(handler) as work:
        ports = {"direct": work.backend_port}
        clients = (ClientTunnel("bench"), ClientTunnel("mux", multiplex=True))
        pair = await start_daemon_pair(work.stack, work.base, work.backend_port, clients=clients)
        ports["qkdproxy"] = pair.ports["bench"]
        ports["qkdproxy-mux"] = pair.ports["mux"]
        if with_stunnel and (port := await _stunnel(work.stack, work.base, work.backend_port)):
            ports["stunnel"] = port
        yield Paths(ports, pair.client_records)


async def _stream(port: int, size: int) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    block = memoryview(os.urandom(CHUNK))
    sent = 0
    while sent < size:
        writer.write(block[: min(CHUNK, size - sent)])
        sent += min(CHUNK, size - sent)
        await writer.drain()
    writer.write_eof()
    count = int.from_bytes(await reader.readexactly(8), "big")
    writer.close()
    if count != size:
        raise RuntimeError(f"sent {size} bytes, the backend counted {count}")
    return size


async def run_throughput(
    megabytes: int, streams: tuple[int, ...], with_stunnel: bool = True
) -> list[ThroughputResult]:
    """Bulk one-way transfer per path and stream count (same run, same machine)."""
    results = []
    async with _paths(_sink, with_stunnel) as paths:
        for path, port in paths.ports.items():
            await _stream(port, CHUNK)  # warm-up: first handshake, caches
            for count in streams:
                size = megabytes * 1024 * 1024 // count
                started = time.perf_counter()
                moved = sum(await asyncio.gather(*(_stream(port, size) for _ in range(count))))
                seconds = time.perf_counter() - started
                results.append(
                    ThroughputResult(path, count, moved * 8 / seconds / 1e9, moved, seconds)
                )
    return results


async def connect_once(port: int) -> float:
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"x")
    await writer.drain()
    await reader.readexactly(1)
    writer.close()
    return time.perf_counter() - started


async def _connect_many(port: int, count: int) -> list[float]:
    return [await connect_once(port) for _ in range(count)]


async def run_connrate(
    connections: int, concurrencies: tuple[int, ...], with_stunnel: bool = True
) -> list[ConnrateResult]:
    """New connections per second (open, one byte each way, close) per path."""
    results = []
    async with _paths(ping_backend, with_stunnel) as paths:
        for path, port in paths.ports.items():
            for _ in range(5):
                await connect_once(port)
            for concurrency in concurrencies:
                share = connections // concurrency
                logged = len(paths.records)
                started = time.perf_counter()
                batches = await asyncio.gather(
                    *(_connect_many(port, share) for _ in range(concurrency))
                )
                seconds = time.perf_counter() - started
                ordered = sorted(t for batch in batches for t in batch)
                await asyncio.sleep(LOG_SETTLE_S)  # the last lines reach us
                results.append(ConnrateResult(
                    path, concurrency, len(ordered) / seconds,
                    statistics.median(ordered) * 1000,
                    ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000,
                    len(ordered), paths.keys_since(path, logged),
                ))  # fmt: skip
    return results
