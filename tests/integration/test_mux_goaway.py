"""Streams a server did not process are sent again, between real daemons: a draining
server (the SIGTERM path) costs the applications nothing; a server refusing everything
costs a connection a bounded number of attempts and no extra tunnel."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from qkdproxy.daemon.app import Daemon
from qkdproxy.daemon.tunnel import ConnectionRecord
from tests.integration.test_tunnel_runtime import Backend, Setup, port, setup, transfer

# No keepalive PINGs: the only bytes a client sends on an idle tunnel are its streams'.
MUX = "multiplex = true\nmux_keepalive_s = 0"


class CountingBackend(Backend):
    """Echoes, and keeps what each connection sent (to tell duplicates from losses)."""

    def __init__(self) -> None:
        super().__init__()
        self.received: list[bytearray] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got = bytearray()
        self.received.append(got)
        try:
            while data := await reader.read(65536):
                got += data
                writer.write(data)
                await writer.drain()
            writer.write_eof()
        except ConnectionError:
            pass
        finally:
            writer.close()


class Front:
    """What stands in front of the servers in a rolling restart (a load balancer, a
    Kubernetes service): new connections go to ``target``. :meth:`hold` keeps the next
    server-to-client bytes back until the client sent ``until`` more bytes: a GOAWAY still
    on its way while the client opens one more stream on the tunnel and sends on it."""

    def __init__(self, target: int) -> None:
        self.target = target
        self._holding = False
        self._until = 0
        self._client_spoke = asyncio.Event()

    def hold(self, until: int) -> None:
        self._holding, self._until = True, until
        self._client_spoke.clear()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)

        async def upstream() -> None:
            while data := await reader.read(65536):
                up_writer.write(data)
                await up_writer.drain()
                self._until -= len(data)
                if self._until <= 0:
                    self._client_spoke.set()
            up_writer.write_eof()

        async def downstream() -> None:
            while data := await up_reader.read(65536):
                if self._holding:
                    await self._client_spoke.wait()
                    self._holding = False
                writer.write(data)
                await writer.drain()
            writer.write_eof()

        with contextlib.suppress(ConnectionError, OSError):
            await asyncio.gather(upstream(), downstream())
        writer.close()
        up_writer.close()


@asynccontextmanager
async def carrying(
    tmp_path: Path, backend: CountingBackend
) -> AsyncIterator[tuple[Setup, Daemon, Daemon]]:
    """A daemon pair whose pool's tunnel carried one connection ("first")."""
    async with (
        setup(tmp_path, backend) as s,
        s.daemon("server", s.server_toml(MUX)) as server,
        s.daemon("client", s.client_toml(port(server), MUX)) as client,
    ):
        assert await transfer(port(client), b"first") == b"first"
        yield s, server, client


def with_backend(text: str, old: int, new: int) -> str:
    return text.replace(f'connect = "127.0.0.1:{old}"', f'connect = "127.0.0.1:{new}"')


def client_streams(records: list[ConnectionRecord]) -> list[ConnectionRecord]:
    return [r for r in records if r.role == "client" and r.mux == "stream"]


def retried_metric(daemon: Daemon) -> float:
    value = daemon.metrics.registry.get_sample_value(
        "qkdproxy_mux_streams_retried_total", {"tunnel": "t"}
    )
    return value or 0.0


@pytest.mark.parametrize("pool_max", [4, 1])
async def test_a_draining_server_costs_a_steady_stream_of_connections_nothing(
    tmp_path: Path, pool_max: int
) -> None:
    """A rolling restart: server A drains the way SIGTERM makes it (Tunnel.stop_accepting,
    then drain) while the front sends new tunnels to server B. One connection is opened
    exactly in the GOAWAY's path (the front holds the GOAWAY until the client has sent that
    stream to A): A refuses it unprocessed, the client sends it again through B. Every
    connection gets its bytes back, A's backend never sees the refused one, B's sees it
    once. With ``mux_pool_max = 1`` the draining tunnel must not hold the pool's only
    place."""
    backend_a, backend_b = CountingBackend(), CountingBackend()
    listener_b = await asyncio.start_server(backend_b.handle, "127.0.0.1", 0)
    port_b = listener_b.sockets[0].getsockname()[1]
    async with (
        setup(tmp_path, backend_a) as s,
        s.daemon("server-a", s.server_toml(MUX)) as server_a,
        s.daemon("server-b", with_backend(s.server_toml(MUX), s.backend_port, port_b)) as b,
    ):
        front = Front(port(server_a))
        front_server = await asyncio.start_server(front.handle, "127.0.0.1", 0)
        try:
            text = s.client_toml(
                front_server_port(front_server), f"{MUX}\nmux_pool_max = {pool_max}"
            )
            async with s.daemon("client", text) as c:
                await drain_while_connecting(c, server_a, b, front, (backend_a, backend_b))
        finally:
            front_server.close()
            listener_b.close()
    streams = client_streams(s.records)
    assert len(streams) == 21
    assert all(r.reason == "closed" for r in streams), [r.reason for r in streams]
    assert sum(r.mux_retries or 0 for r in streams) == 1
    [retried] = [r for r in streams if r.mux_retries]
    tunnels = [r for r in s.records if r.mux == "tunnel" and r.role == "client"]
    assert all(not r.reason.startswith("error") for r in tunnels), [r.reason for r in tunnels]
    assert retried.mux_tunnel != streams[0].mux_tunnel  # carried by B's tunnel
    assert retried.bytes_to_peer == retried.bytes_from_peer == 3 * 1024 * 1024  # once


def front_server_port(server: asyncio.Server) -> int:
    return int(server.sockets[0].getsockname()[1])


async def drain_while_connecting(
    client: Daemon,
    server_a: Daemon,
    server_b: Daemon,
    front: Front,
    backends: tuple[CountingBackend, CountingBackend],
) -> None:
    payloads = [os.urandom(200_000) for _ in range(20)]
    # The one in the GOAWAY's path: more than a stream window, so at the refusal part of it
    # was sent to A, part was read but waited for window, part was still unread.
    payloads[5] = os.urandom(3 * 1024 * 1024)
    # A long-lived connection on A: A's tunnel stays up through the drain (no stream of
    # it is cut), and ends once this connection did.
    long_reader, long_writer = await asyncio.open_connection("127.0.0.1", port(client))
    long_writer.write(b"before")
    assert await long_reader.readexactly(6) == b"before"
    for payload in payloads[:5]:
        assert await transfer(port(client), payload) == payload
    # The rolling restart: B takes new tunnels, A stops taking streams (GOAWAY).
    pool = client.tunnels[0].pool
    assert pool is not None
    [to_a] = pool.tunnels
    moved_before = to_a.bytes_moved
    front.target = port(server_b)
    front.hold(until=512 * 1024)
    stopping = server_a.tunnels[0]
    stopping.stop_accepting()
    drained = asyncio.ensure_future(stopping.drain(30))
    for payload in payloads[5:]:
        assert await transfer(port(client), payload) == payload
    assert retried_metric(client) == 1
    assert to_a.bytes_moved - moved_before >= 512 * 1024  # sent to A before its refusal
    # The long-lived connection still works, then ends; so does A's drain, nothing cut.
    long_writer.write(b"after")
    assert await long_reader.readexactly(5) == b"after"
    long_writer.write_eof()
    assert await long_reader.read() == b""
    long_writer.close()
    assert await asyncio.wait_for(drained, 30) == 0
    # A's backend got the first connections only (the refused stream's bytes, which
    # reached A, were dropped there); B's got each later one once, byte for byte.
    backend_a, backend_b = backends
    assert sorted(bytes(r) for r in backend_a.received) == sorted([b"beforeafter", *payloads[:5]])
    assert sorted(bytes(r) for r in backend_b.received) == sorted(payloads[5:])
    assert client.tunnels[0].keys.ledger.taken == 2  # one tunnel to A, one to B


async def test_a_server_refusing_every_stream_costs_bounded_attempts_and_no_tunnel(
    tmp_path: Path,
) -> None:
    """A hostile (or broken) server: its tunnel stays up but refuses every stream with
    REFUSED_STREAM, never a GOAWAY. The connection fails after 1 + STREAM_RETRIES attempts
    with a reason that says so; the pool's one tunnel (one QKD key) had room for every
    retry, so nothing more was dialled, and the backend never saw a byte of it."""
    backend = CountingBackend()
    async with carrying(tmp_path, backend) as (s, server, client):
        [carrier] = server.tunnels[0]._mux_tunnels
        carrier.draining = True  # refuses each new stream, as when draining, but silently
        with contextlib.suppress(ConnectionResetError):
            assert await transfer(port(client), b"refused every time") == b""
        pool = client.tunnels[0].pool
        assert pool is not None
        assert len(pool.tunnels) == 1 and pool.establish_failures == 0
        assert client.tunnels[0].keys.ledger.taken == 1
        assert retried_metric(client) == 2
    failed = client_streams(s.records)[-1]
    assert failed.reason == "error: not processed by the peer (REFUSED_STREAM) after 3 attempts"
    assert failed.mux_retries == 2
    assert [bytes(r) for r in backend.received] == [b"first"]


async def test_a_refusal_with_a_status_is_not_retried(tmp_path: Path) -> None:
    """502 (the server's backend is down) says the server acted on the stream: the
    connection fails at once, as before."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead = closed.getsockname()[1]
    async with setup(tmp_path) as s:
        down = with_backend(s.server_toml(MUX), s.backend_port, dead)
        async with (
            s.daemon("server", down) as server,
            s.daemon("client", s.client_toml(port(server), MUX)) as client,
        ):
            assert await transfer(port(client), b"nobody there") == b""
            assert retried_metric(client) == 0
    [refused] = client_streams(s.records)
    assert "status 502" in refused.reason and refused.mux_retries == 0


async def test_a_server_sending_goaway_on_every_tunnel_costs_a_key_per_backoff_step(
    tmp_path: Path,
) -> None:
    """A server that sends GOAWAY on every tunnel before taking a stream (hostile, or one
    whose handshakes were under way as its listeners closed): each tunnel it disowns at
    once counts as a failed establishment, so the pool backs off instead of spending a
    QKD key per connection, retries included."""
    backend = CountingBackend()
    async with carrying(tmp_path, backend) as (s, server, client):
        hostile = server.tunnels[0]
        hostile._stopping = True  # every new tunnel: GOAWAY behind its SETTINGS
        for carrier in hostile._mux_tunnels:
            carrier.stop_streams()  # and the established one goes away too
        for _ in range(5):
            with contextlib.suppress(ConnectionResetError):
                assert await transfer(port(client), b"goes nowhere") == b""
        pool = client.tunnels[0].pool
        assert pool is not None
        assert pool.establish_failures >= 1
        # Every key past the first went to a tunnel disowned at once, and each of those
        # set a backoff before the next.
        assert client.tunnels[0].keys.ledger.taken == 1 + pool.establish_failures
        assert not pool.tunnels
    # Mostly no stream to be had at all (a line without `mux`); one opened on the first
    # tunnel before its GOAWAY arrived is a stream whose retry found none.
    failed = [r for r in s.records if r.role == "client" and r.mux != "tunnel"][1:]
    assert len(failed) == 5
    assert all("the peer sent GOAWAY before taking a stream" in r.reason for r in failed), [
        r.reason for r in failed
    ]
    assert [bytes(r) for r in backend.received] == [b"first"]
