"""Helpers for the fault-matrix system tests (tests/test_faults_*.py).

They build on tests/system/test_daemon_system.py (its ``Proc``, ``Backend`` and ``Harness``) and add
what fault injection needs: KME simulators started with their own options and fixed ports
(so one can be killed and started again where the daemons expect it), daemons with several
tunnels and a status listener, the daemon's /status, /readyz and /metrics, a development PKI
whose CA key stays in memory (to issue certificates outside their validity), and
connections that report how they ended.

No helper sleeps to synchronise: everything waits for a log line, a JSON line, an event or
a condition polled with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import struct
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from qkdproxy.core.tls.credentials import Credentials, load_trust_anchors
from qkdproxy.keys.sources import REFUSALS_BEFORE_FLUSH
from qkdproxy.keys.sslctx import client_context, server_context
from qkdproxy.tools.bench.processes import free_port
from qkdproxy.tools.certs import DevPki
from tests.system.test_daemon_system import (
    CLIENT_ID,
    DEADLINE,
    LISTENING,
    SERVER_ID,
    SERVER_NAME,
    Backend,
    Harness,
    Proc,
    TomlValue,
    WatchedServer,
    exchange,
    read_until_eof,
    toml_table,
)

STATUS = re.compile(r"status on http://127\.0\.0\.1:(\d+) ")
Table = Mapping[str, TomlValue | None]

__all__ = [
    "CLIENT_ID",
    "DEADLINE",
    "SERVER_ID",
    "Backend",
    "Ending",
    "FaultHarness",
    "Kme",
    "KmeFront",
    "Node",
    "RecordingBackend",
    "StatusListener",
    "Transfer",
    "eventually",
    "free_port",
    "metric",
    "recovers_after_refusals",
    "refused",
    "works",
]


async def eventually(
    check: Callable[[], Awaitable[bool]], what: str, within: float = DEADLINE
) -> None:
    """Poll ``check`` until it is true; fail naming ``what`` after ``within`` seconds. The
    pause between polls only paces the polling: the deadline decides, never the pause."""
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {within}s: {what}")
        await asyncio.sleep(0.05)


async def works(port: int, size: int = 20_000) -> bool:
    """One exchange of ``size`` random bytes through a client tunnel: True if they came back
    whole. Whatever came back must be a prefix of what was sent (never a wrong byte)."""
    payload = os.urandom(size)
    try:
        echoed = await exchange(port, payload)
    except OSError:
        return False
    assert payload.startswith(echoed), "corrupted bytes"
    return echoed == payload


async def refused(port: int) -> bytes:
    """Send a request and EOF through a client tunnel and read to the end: what came back
    (a reset counts as the end)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        with contextlib.suppress(OSError):
            writer.write(b"request")
            await writer.drain()
            writer.write_eof()
        return await read_until_eof(reader)
    finally:
        writer.close()


async def recovers_after_refusals(client: Node, tunnel: str) -> str | None:
    """Connections through ``tunnel`` fail at most REFUSALS_BEFORE_FLUSH - 1 times (each
    refusal costs one key), then all work. The flush warning, if the streak got that far."""
    outcomes = [await works(client.ports[tunnel]) for _ in range(REFUSALS_BEFORE_FLUSH + 2)]
    assert True in outcomes, client.proc.records()
    first = outcomes.index(True)
    assert first <= REFUSALS_BEFORE_FLUSH - 1 and all(outcomes[first:]), outcomes
    # A flush happened if the supply held REFUSALS_BEFORE_FLUSH suspect keys or more.
    await client.settled()
    warnings = [line for line in client.proc.lines if "key supply flushed" in line]
    assert all(f"tunnel {tunnel}: the peer refused our QKD keys" in w for w in warnings)
    return warnings[0] if warnings else None


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels`` (0 if none); a
    trailing underscore is dropped from a label name (``class_`` for ``class``)."""
    wanted = {k.rstrip("_"): v for k, v in labels.items()}
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in wanted.items()):
            total += float(value)
    return total


@dataclass
class Kme:
    """A ``qkdproxy kme`` simulator process: its ETSI 014 URLs and ETSI 004 addresses by KME
    id."""

    proc: Proc
    urls: dict[str, str]
    etsi004: dict[str, str]


@dataclass
class StatusListener:
    """A daemon's status listener: /status, /readyz, /metrics."""

    status_port: int

    async def get(self, path: str) -> tuple[int, str]:
        """GET ``path`` on the status listener: (HTTP status, body). A 429 (a test polling
        faster than the listener's per-address budget) is asked again after its
        Retry-After, as a well-behaved scraper would."""
        timeout = aiohttp.ClientTimeout(total=DEADLINE)
        deadline = time.monotonic() + DEADLINE
        while True:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.get(f"http://127.0.0.1:{self.status_port}{path}") as response,
            ):
                if response.status != 429 or time.monotonic() > deadline:
                    return response.status, await response.text()
                await asyncio.sleep(float(response.headers.get("Retry-After", "1")))

    async def status(self) -> dict[str, Any]:
        code, body = await self.get("/status")
        assert code == 200, body
        document: dict[str, Any] = json.loads(body)
        return document

    async def ready(self) -> tuple[bool, list[str]]:
        code, body = await self.get("/readyz")
        answer = json.loads(body)
        assert (code == 200) == answer["ready"], (code, body)
        return bool(answer["ready"]), list(answer["reasons"])

    async def metrics(self) -> str:
        code, body = await self.get("/metrics")
        assert code == 200, body
        return body


@dataclass(kw_only=True)
class Node(StatusListener):
    """A running ``qkdproxy run``: its plaintext/TLS ports by tunnel name, its stderr."""

    proc: Proc
    config: Path
    ports: dict[str, int]

    async def settled(self) -> int:
        """Once no connection is open and every closed one has been logged: their number."""
        closed = 0

        async def idle() -> bool:
            nonlocal closed
            tunnels = (await self.status())["tunnels"]
            closed = sum(t["closed"] for t in tunnels)
            return all(t["active"] == 0 for t in tunnels)

        await eventually(idle, f"{self.proc.name}: no connection open")
        await self.proc.wait_line(lambda _line: len(self.proc.records()) >= closed)
        return closed


@dataclass
class Ending:
    """What a plaintext client saw: the bytes that came back, and how the stream ended."""

    received: bytes
    how: str  # "eof" (FIN), "reset" (RST or another socket error)


@dataclass
class Transfer:
    """A checksummed transfer through a client tunnel, driven in steps: ``open``, ``send``
    a part, ``until`` some of the echo came back, ``finish`` (send the rest, EOF, read all)."""

    port: int
    payload: bytes
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    received: bytearray = field(default_factory=bytearray)
    how: str | None = None
    _reading: asyncio.Task[None] | None = None
    _grew: asyncio.Event = field(default_factory=asyncio.Event)

    async def open(self) -> Transfer:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        self._reading = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self.reader is not None
        try:
            while data := await self.reader.read(65536):
                self.received += data
                self._grew.set()
            self.how = "eof"
        except OSError:
            self.how = "reset"
        self._grew.set()

    async def send(self, data: bytes, eof: bool = False) -> None:
        assert self.writer is not None
        self.writer.write(data)
        await self.writer.drain()
        if eof:
            self.writer.write_eof()

    async def until(self, count: int, within: float = DEADLINE) -> None:
        """Until at least ``count`` bytes came back (or the stream ended)."""
        async with asyncio.timeout(within):
            while len(self.received) < count and self.how is None:
                self._grew.clear()
                await self._grew.wait()

    async def finish(self, sent: int, within: float = DEADLINE) -> Ending:
        """Send ``payload[sent:]`` and EOF, then read to the end (errors while sending are
        kept: the stream may have been cut)."""
        assert self.writer is not None and self._reading is not None
        with contextlib.suppress(OSError):
            await self.send(self.payload[sent:])
            self.writer.write_eof()
        return await self.end(within)

    async def end(self, within: float = DEADLINE) -> Ending:
        """Wait until the stream ended; close our side."""
        assert self.writer is not None and self._reading is not None
        try:
            await asyncio.wait_for(asyncio.shield(self._reading), within)
        finally:
            self.writer.close()
        assert self.how is not None
        return Ending(bytes(self.received), self.how)


class FaultHarness(Harness):
    """A :class:`Harness` that starts KME simulators with options and multi-tunnel daemons."""

    def __init__(self, tmp: Path, pki: Path, dev: DevPki) -> None:
        super().__init__(tmp, pki)
        self.dev = dev
        self.silent: list[asyncio.subprocess.Process] = []
        self.fronts: list[KmeFront] = []
        self.recorders: list[RecordingBackend] = []

    async def start_kme(
        self, *args: str | Path, ports: tuple[int, int] | None = None, name: str = "kme"
    ) -> Kme:
        """``qkdproxy kme`` with ``args``; returns once it printed its addresses."""
        fixed: list[str | Path] = []
        if ports is not None:
            fixed = ["--port-a", str(ports[0]), "--port-b", str(ports[1])]
        proc = await self.spawn(name, "kme", "--pki", self.pki, *fixed, *args)
        assert proc.process.stdout is not None
        try:
            line = await asyncio.wait_for(proc.process.stdout.readline(), DEADLINE)
        except TimeoutError:
            pytest.fail(f"qkdproxy kme printed nothing; stderr:\n{proc.stderr}")
        if not line:
            await proc.wait_exit()
            pytest.fail(f"qkdproxy kme ended early; stderr:\n{proc.stderr}")
        addresses = json.loads(line)
        return Kme(proc, dict(addresses["kme"]), dict(addresses["etsi004"]))

    def kme_table(self, url: str, side: str, **overrides: TomlValue | None) -> dict[str, Any]:
        """A ``[kme.NAME]`` table for side "a" (client, master) or "b" (server, slave)."""
        sae, peer = ("sae-a", "sae-b") if side == "a" else ("sae-b", "sae-a")
        return {
            "api": "014", "url": url, "sae_id": sae, "peer_sae_id": peer,
            "cert": str(self.pki / f"{sae}.pem"), "key": str(self.pki / f"{sae}-key.pem"),
            "ca": str(self.pki / "ca.pem"), **overrides,
        }  # fmt: skip

    def kme004_table(
        self, address: str, side: str, **overrides: TomlValue | None
    ) -> dict[str, Any]:
        """A ``[kme.NAME]`` table for ETSI 004 (``address`` is host:port)."""
        table = self.kme_table("", side, api="004", address=address, **overrides)
        del table["url"]
        return table

    def kme_side(self, kme: Kme, side: str, api: str = "014", **overrides: Any) -> dict[str, Any]:
        """The ``[kme.NAME]`` table of side "a" or "b" of simulator ``kme`` over ``api``."""
        if api == "004":
            return self.kme004_table(kme.etsi004[f"kme-{side}"], side, **overrides)
        return self.kme_table(kme.urls[f"kme-{side}"], side, **overrides)

    def server_tunnel(self, name: str, backend_port: int, **overrides: Any) -> dict[str, Any]:
        return {
            "name": name, "role": "server", "listen": "127.0.0.1:0",
            "connect": f"127.0.0.1:{backend_port}",
            "cert": str(self.pki / "tunnel-server.pem"),
            "key": str(self.pki / "tunnel-server-key.pem"), "ca": str(self.pki / "ca.pem"),
            "allow": [CLIENT_ID], "kme": "local", "policy": "qkd-pq-required",
            "groups": ["qkd_mlkem768"], "handshake_timeout_s": 5, "connect_timeout_s": 2,
            **overrides,
        }  # fmt: skip

    def client_tunnel(self, name: str, server_port: int, **overrides: Any) -> dict[str, Any]:
        return {
            "name": name, "role": "client", "listen": "127.0.0.1:0",
            "connect": f"127.0.0.1:{server_port}", "server_name": SERVER_NAME,
            "cert": str(self.pki / "tunnel-client.pem"),
            "key": str(self.pki / "tunnel-client-key.pem"), "ca": str(self.pki / "ca.pem"),
            "allow": [SERVER_ID], "kme": "local", "policy": "qkd-pq-required",
            "groups": ["qkd_mlkem768"], "handshake_timeout_s": 5, "connect_timeout_s": 2,
            **overrides,
        }  # fmt: skip

    def config(
        self,
        filename: str,
        tunnels: Sequence[Table],
        kmes: Mapping[str, Table] | None = None,
        daemon: Table | None = None,
        status_port: int = 0,
    ) -> Path:
        """A daemon configuration with a status listener (on a free port by default)."""
        text = toml_table("[daemon]", {"log_level": "info", **(daemon or {})})
        text += toml_table("[status]", {"listen": f"127.0.0.1:{status_port}"})
        for name, table in (kmes or {}).items():
            text += toml_table(f"[kme.{name}]", table)
        for tunnel in tunnels:
            text += toml_table("[[tunnel]]", tunnel)
        return self.write(filename, text)

    async def node(self, config: Path, env: Mapping[str, str] | None = None) -> Node:
        """``qkdproxy run``; returns once every tunnel and the status listener are up."""
        proc = await self.spawn(config.stem, "run", "--config", config, env=env)
        line = await proc.wait_line(lambda text: STATUS.search(text) is not None)
        match = STATUS.search(line)
        assert match is not None
        ports = {}
        for text in proc.lines:
            if found := LISTENING.search(text):
                ports[found.group(1)] = int(found.group(4))
        return Node(status_port=int(match.group(1)), proc=proc, config=config, ports=ports)

    async def silent_node(
        self, config: Path, status_port: int, output: Path
    ) -> tuple[asyncio.subprocess.Process, StatusListener]:
        """``qkdproxy run`` with stdout and stderr going to ``output`` (e.g. /dev/full);
        returns once its status listener (started after every tunnel listens) answers."""
        with output.open("wb") as sink:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "qkdproxy", "run", "--config", str(config),
                stdin=asyncio.subprocess.DEVNULL, stdout=sink, stderr=sink,
                env=dict(os.environ), cwd=self.tmp,
            )  # fmt: skip
        self.silent.append(process)
        listener = StatusListener(status_port)

        async def healthy() -> bool:
            assert process.returncode is None, f"the daemon exited with {process.returncode}"
            try:
                return await listener.get("/healthz") == (200, "ok\n")
            except aiohttp.ClientError:
                return False

        await eventually(healthy, f"{config.name}: /healthz")
        return process, listener

    async def front(self, kme: str, sae: str, upstream: str) -> KmeFront:
        """A :class:`KmeFront` before ``upstream``, passing calls through until told not to."""
        front = KmeFront(self.pki, kme, sae, upstream)
        self.fronts.append(front)
        await front.start()
        return front

    async def recording_backend(
        self, mode: str = "echo", reset_after: int = 0
    ) -> tuple[RecordingBackend, int]:
        backend = RecordingBackend(mode, reset_after)
        self.recorders.append(backend)
        return backend, await backend.start()

    async def close(self) -> None:
        for process in self.silent:
            if process.returncode is None:
                process.kill()
            await process.wait()
        for recorder in self.recorders:
            recorder.close()
        for front in self.fronts:
            await front.close()
        await super().close()


@pytest.fixture(scope="module", name="fault_pki")
def fault_pki_fixture(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DevPki]:
    """The development PKI (the file names of ``qkdproxy certs``), CA key kept in memory."""
    directory = tmp_path_factory.mktemp("pki")
    dev = DevPki.create()
    dev.write(directory)
    return directory, dev


@pytest.fixture(name="faults")
async def faults_fixture(
    tmp_path: Path, fault_pki: tuple[Path, DevPki]
) -> AsyncIterator[FaultHarness]:
    """A harness whose processes and backends are stopped at the end of the test."""
    harness = FaultHarness(tmp_path, *fault_pki)
    try:
        yield harness
    finally:
        await harness.close()


def reset_connection(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0) instead of FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class KmeFront:
    """An ETSI 014 KME as a daemon sees it, standing in front of a simulator KME.

    It serves HTTPS with the simulator KME's certificate and requires a client certificate,
    like a KME. While ``answer`` is None every call is passed to the simulator (presenting
    the SAE certificate of the side it fronts); otherwise every call is answered at once with
    that (HTTP status, Error message). ``answered`` counts the answers by status.
    """

    def __init__(self, pki: Path, kme: str, sae: str, upstream: str) -> None:
        anchors = load_trust_anchors(pki / "ca.pem")
        own = Credentials.load(pki / f"{kme}.pem", pki / f"{kme}-key.pem")
        sae_credentials = Credentials.load(pki / f"{sae}.pem", pki / f"{sae}-key.pem")
        self._server_ssl = server_context(own, anchors)
        self._client_ssl = client_context(sae_credentials, anchors)
        self.upstream = upstream
        self.answer: tuple[int, str] | None = None
        self.answered: dict[int, int] = {}
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.url = ""

    async def start(self) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        sock = socket.create_server(("127.0.0.1", 0))
        await web.SockSite(self._runner, sock, ssl_context=self._server_ssl).start()
        self.url = f"https://127.0.0.1:{sock.getsockname()[1]}"
        return self.url

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if self.answer is not None:
            status, message = self.answer
            self.answered[status] = self.answered.get(status, 0) + 1
            return web.json_response({"message": message}, status=status)
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._client_ssl)
            )
        async with self._session.request(
            request.method, self.upstream + request.path_qs, data=await request.read(),
            headers={"Content-Type": request.headers.get("Content-Type", "application/json")},
        ) as response:  # fmt: skip
            body = await response.read()
            self.answered[response.status] = self.answered.get(response.status, 0) + 1
            return web.Response(
                body=body, status=response.status, content_type=response.content_type
            )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()


class RecordingBackend(WatchedServer):
    """A backend that records how each connection ended ("eof", "reset") and what arrived.

    ``mode``: "echo" echoes; "reset" echoes the first ``reset_after`` bytes and resets the
    connection (RST) once ``release`` is set (so the test can see those bytes arrive first:
    a reset discards what is still in the send buffer); "gated" accepts and reads but
    answers only once ``release`` is set, then echoes everything it read.
    """

    def __init__(self, mode: str = "echo", reset_after: int = 0) -> None:
        super().__init__()
        self.mode = mode
        self.reset_after = reset_after
        self.endings: list[tuple[str, int]] = []
        self.received = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got = bytearray()
        how = "eof"
        try:
            while data := await reader.read(65536):
                got += data
                self.received += len(data)
                self._advance()
                if self.mode == "echo":
                    writer.write(data)
                    await writer.drain()
                elif self.mode == "reset" and len(got) >= self.reset_after:
                    writer.write(bytes(got[: self.reset_after]))
                    await writer.drain()
                    await self.release.wait()
                    reset_connection(writer)
                    how = "reset-by-us"
                    return
            if self.mode == "gated":
                await self.release.wait()
                writer.write(bytes(got))
                await writer.drain()
            writer.write_eof()
        except OSError:
            how = "reset"
        finally:
            self.endings.append((how, len(got)))
            writer.close()
            self._advance()

    def close(self) -> None:
        self.release.set()  # no handler is left waiting when the loop ends
        super().close()
