"""The status listener against hostile HTTP clients, over real sockets: clients that never
finish a request, trickle it, or never read the answer are cut; requests of every shape get
a bounded answer and never run anything but the four GET handlers. The daemons' side of
these attacks (descriptors, log lines, metric series) is in
tests/system/test_operator_surfaces_attack.py."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric

from qkdproxy.daemon.status import (
    MAX_CONNECTIONS_PER_SOURCE,
    REQUEST_BURST_PER_SOURCE,
    REQUESTS_PER_SOURCE_S,
    RequestBudget,
    StatusServer,
    create_app,
)
from tests.system_helpers import eventually

DEADLINE = 15.0
BIG_LABEL = "x" * 1000


class Big:
    """A collector whose exposition is about 1 MB: one answer fills the socket buffers."""

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("big", "a large exposition", labels=["n"])
        for n in range(1000):
            family.add_metric([f"{n}{BIG_LABEL}"], n)
        yield family


@contextlib.asynccontextmanager
async def status_server(
    budget: RequestBudget | None = None, **bounds: float
) -> AsyncIterator[StatusServer]:
    registry = CollectorRegistry()
    registry.register(Big())
    server = StatusServer(
        create_app(registry, lambda: (True, []), lambda: {"version": "test"}, budget),
        **bounds,
    )
    await server.start("127.0.0.1", 0)
    try:
        yield server
    finally:
        await server.stop()


async def connect(server: StatusServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = server.address.rsplit(":", 1)
    return await asyncio.open_connection(host, int(port))


async def ended(reader: asyncio.StreamReader) -> bytes:
    """Everything until the server closed or reset the connection."""
    received = bytearray()
    with contextlib.suppress(ConnectionError):
        async with asyncio.timeout(DEADLINE):
            while data := await reader.read(65536):
                received += data
    return bytes(received)


async def until(condition: Callable[[], bool], what: str) -> None:
    async def check() -> bool:
        return condition()

    await eventually(check, what)


async def test_silent_trickling_and_unread_clients_are_cut() -> None:
    """A silent client, one trickling header lines every 50 ms, and one that pipelines 30
    requests for a 1 MB /metrics and never reads (more than the kernel's socket buffers
    take): all three are held at first, then each is closed by the server (before:
    aiohttp's default kept the first two for an hour, and the third for ever)."""
    async with status_server(lifetime_s=1.0, idle_s=0.3) as server:
        silent = await connect(server)
        trickling = await connect(server)
        unread = await connect(server)
        unread[1].write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 30)
        await until(lambda: server.connections == 3, "three connections held")

        async def trickle() -> None:
            trickling[1].write(b"GET /healthz HTTP/1.1\r\n")
            with contextlib.suppress(ConnectionError):
                for n in range(1000):
                    trickling[1].write(b"X-%d: y\r\n" % n)
                    await trickling[1].drain()
                    await asyncio.sleep(0.05)

        trickler = asyncio.create_task(trickle())
        assert await ended(silent[0]) == b""
        assert b"HTTP/1.1 200" not in await ended(trickling[0])
        await until(lambda: server.connections == 0, "every connection cut")
        await trickler
        for _, writer in (silent, trickling, unread):
            writer.close()


async def test_one_source_gets_its_share_and_the_next_a_503() -> None:
    async with status_server() as server:
        held = [await connect(server) for _ in range(MAX_CONNECTIONS_PER_SOURCE)]
        await until(lambda: server.connections == MAX_CONNECTIONS_PER_SOURCE, "share held")
        reader, writer = await connect(server)
        assert (await ended(reader)).startswith(b"HTTP/1.1 503 ")
        writer.close()
        for _, held_writer in held:
            held_writer.close()
        await until(lambda: server.connections == 0, "the share given back")
        reader, writer = await connect(server)
        writer.write(b"GET /healthz HTTP/1.0\r\n\r\n")
        assert (await ended(reader)).startswith(b"HTTP/1.0 200 ")
        writer.close()


SHAPES = {
    "POST": (b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc", 405),
    "PUT": (b"PUT /status HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 405),
    "DELETE": (b"DELETE /status HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    "TRACE": (b"TRACE /status HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    "OPTIONS *": (b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n", 404),
    "CONNECT": (b"CONNECT evil:443 HTTP/1.1\r\nHost: evil:443\r\n\r\n", 404),
    "made-up method": (b"FOO /status HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "HTTP/1.0 without Host": (b"GET /healthz HTTP/1.0\r\n\r\n", 200),
    "HEAD": (b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n", 200),
    "dot segments": (b"GET /../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n", 404),
    "encoded dot segments": (b"GET /status/..%2f..%2fetc%2fpasswd HTTP/1.1\r\nHost: x\r\n\r\n", 404),
    "absolute form": (b"GET http://evil/healthz HTTP/1.1\r\nHost: x\r\n\r\n", 200),
    "huge URL": (b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "huge header": (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 100_000 + b"\r\n\r\n", 400),
    "1,000 headers": (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X%d: y\r\n" % i for i in range(1000)) + b"\r\n", 400,
    ),
    "control bytes in the path": (b"GET /\x1b[2J\n HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "chunked body with GET": (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"ffffffff\r\n", 200,
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", SHAPES)
async def test_requests_of_every_shape_get_a_bounded_answer(name: str) -> None:
    request, status = SHAPES[name]
    async with status_server() as server:
        reader, writer = await connect(server)
        writer.write(request)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        try:
            answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE)
        except asyncio.IncompleteReadError as exc:
            answer = exc.partial
        writer.close()
        assert answer.split(b" ", 2)[1] == str(status).encode(), answer[:200]
        assert len(answer) < 2_000_000


async def test_pipelined_requests_are_answered_in_order_and_bounded() -> None:
    """200 pipelined requests for the three small answers: every one answered, in order;
    aiohttp stops reading while its queue of parsed requests is full."""
    paths = [b"/healthz", b"/readyz", b"/status"] * 67
    # Room for all of them at once: the request budget is another test's subject.
    async with status_server(RequestBudget((1000.0, 1000.0), (1000.0, 1000.0))) as server:
        reader, writer = await connect(server)
        writer.write(b"".join(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % p for p in paths))
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = await ended(reader)
        writer.close()
    bodies = [part for part in answer.split(b"HTTP/1.1 200 OK\r\n") if part]
    assert len(bodies) == len(paths) + 1
    for path, body in zip(paths, bodies, strict=False):
        expected = {b"/healthz": b"ok\n", b"/readyz": b'"ready"', b"/status": b'"version"'}
        assert expected[path] in body


async def test_one_address_asking_back_to_back_gets_429_and_the_probes_still_pass() -> None:
    """100 requests for /status (a costly path: /metrics takes a real daemon 1.5-2 ms of
    CPU) back to back on one connection: the first REQUEST_BURST_PER_SOURCE are answered,
    then about REQUESTS_PER_SOURCE_S a second, the rest get 429 with Retry-After; another
    address's /healthz is answered at once. (Before: every one was answered, so a few
    clients kept the event loop the tunnels run on busy.)"""
    async with status_server() as server:
        reader, writer = await connect(server)
        writer.write(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n" * 99)
        writer.write(b"GET /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        started = time.monotonic()
        answer = await ended(reader)
        elapsed = time.monotonic() - started
        writer.close()
        host, port = server.address.rsplit(":", 1)
        other = await asyncio.open_connection(host, int(port), local_addr=("127.0.0.2", 0))
        other[1].write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        probe = await ended(other[0])
        other[1].close()
    answered = answer.count(b"HTTP/1.1 200 OK\r\n")
    refused = answer.count(b"HTTP/1.1 429 Too Many Requests\r\n")
    assert answered + refused == 100
    most = REQUEST_BURST_PER_SOURCE + REQUESTS_PER_SOURCE_S * elapsed + 1
    assert REQUEST_BURST_PER_SOURCE <= answered <= most, (answered, elapsed)
    assert refused > 0 and b"Retry-After: 1" in answer
    assert probe.startswith(b"HTTP/1.1 200 OK\r\n") and probe.endswith(b"ok\n")
