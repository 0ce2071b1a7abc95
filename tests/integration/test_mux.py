"""Multiplexed tunnels between daemons (real sockets, real KME simulator)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from qkdproxy.core.mux import ResetCode
from qkdproxy.core.proxyv2 import PP2_TYPE_QKDPROXY_PEER
from qkdproxy.daemon import gate
from qkdproxy.daemon.config import MuxSettings, load_config
from qkdproxy.daemon.tunnel import ConnectionRecord
from tests.integration.test_tunnel_runtime import Backend, parse_tlvs, port, setup, transfer
from tests.system_helpers import eventually
from tests.unit.test_config import CLIENT, KME, problems, write

MUX = "multiplex = true\nmux_keepalive_s = 5"


async def test_many_concurrent_streams_share_one_tunnel(tmp_path: Path) -> None:
    async with (
        setup(tmp_path) as s,
        s.daemon("server", s.server_toml(MUX)) as server,
        s.daemon("client", s.client_toml(port(server), MUX)) as client,
    ):
        payloads = [os.urandom(1000 + 5000 * i) for i in range(40)]
        got = await asyncio.gather(*(transfer(port(client), p) for p in payloads))
        assert got == payloads
        ledger = client.tunnels[0].keys.ledger
        assert ledger.taken == 1
    streams = [r for r in s.records if r.mux == "stream"]
    assert len([r for r in streams if r.role == "client"]) == 40
    assert len([r for r in streams if r.role == "server"]) == 40
    assert all(r.reason == "closed" for r in streams), {r.reason for r in streams}


class AnswerAfterEof(Backend):
    """Reads until EOF (the client's half-close), then answers with the digest."""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        digest = hashlib.sha256(await reader.read(-1)).digest()
        writer.write(digest)
        await writer.drain()
        writer.close()


async def test_half_close_reaches_the_backend_and_the_answer_comes_back(tmp_path: Path) -> None:
    async with (
        setup(tmp_path, AnswerAfterEof()) as s,
        s.daemon("server", s.server_toml(MUX)) as server,
        s.daemon("client", s.client_toml(port(server), MUX)) as client,
    ):
        payload = os.urandom(300_000)
        assert await transfer(port(client), payload) == hashlib.sha256(payload).digest()


class SpeaksFirst(Backend):
    """A server-speaks-first protocol: a greeting as soon as the connection is made."""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 ready\r\n")
        await writer.drain()
        await reader.read(-1)
        writer.close()


async def test_a_silent_application_still_gets_a_speaking_backend(tmp_path: Path) -> None:
    # The client queues a stream's request to send it with the first data: an application
    # that sends nothing must still reach the backend (the request leaves when the pump
    # starts waiting for the peer), not only with a keepalive PING (none comes here).
    quiet = "multiplex = true\nmux_keepalive_s = 60"
    async with (
        setup(tmp_path, SpeaksFirst()) as s,
        s.daemon("server", s.server_toml(quiet)) as server,
        s.daemon("client", s.client_toml(port(server), quiet)) as client,
    ):
        for _ in range(3):
            reader, writer = await asyncio.open_connection("127.0.0.1", port(client))
            assert await asyncio.wait_for(reader.readexactly(11), 5) == b"220 ready\r\n"
            writer.close()
            await writer.wait_closed()


class ResetAfterFirstBytes(Backend):
    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(5)
        writer.write(b"hello")
        await writer.drain()
        await asyncio.sleep(0.05)
        gate.reset(writer)


async def test_a_backend_reset_resets_the_application_side(tmp_path: Path) -> None:
    async with (
        setup(tmp_path, ResetAfterFirstBytes()) as s,
        s.daemon("server", s.server_toml(MUX)) as server,
        s.daemon("client", s.client_toml(port(server), MUX)) as client,
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", port(client))
        writer.write(b"12345")
        assert await asyncio.wait_for(reader.readexactly(5), 10) == b"hello"
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(), 10)
        writer.close()
        # The tunnel carries on: the next stream works.
        assert client.tunnels[0].pool is not None
        assert len(client.tunnels[0].pool.tunnels) == 1
        await asyncio.wait_for(client.tunnels[0].wait_idle(), 10)
    server_stream = next(r for r in s.records if r.role == "server" and r.mux == "stream")
    assert server_stream.reason.startswith("error")


class SlowBackend(Backend):
    """Reads nothing until released, then echoes a digest of everything."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = await reader.readexactly(4)
        if first == b"fast":
            writer.write(first)
            await Backend.handle(self, reader, writer)
            return
        await self.release.wait()
        digest = hashlib.sha256(first + await reader.read(-1)).digest()
        writer.write(digest)
        await writer.drain()
        writer.close()


async def test_a_slow_backend_pushes_back_without_stalling_other_streams(tmp_path: Path) -> None:
    backend = SlowBackend()
    async with (
        setup(tmp_path, backend) as s,
        s.daemon("server", s.server_toml(MUX)) as server,
        s.daemon("client", s.client_toml(port(server), MUX)) as client,
    ):
        payload = b"slow" + os.urandom(16 << 20)
        reader, writer = await asyncio.open_connection("127.0.0.1", port(client))
        writer.write(payload)
        # Bounded buffers: 16 MiB cannot all leave the application while nobody reads.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(writer.drain(), 1.0)
        assert await transfer(port(client), b"fast, alongside") == b"fast, alongside"
        backend.release.set()
        await asyncio.wait_for(writer.drain(), 20)
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 20) == hashlib.sha256(payload).digest()
        writer.close()


async def test_proxy_v2_header_per_stream(tmp_path: Path) -> None:
    backend = Backend(strip_proxy_header=True)
    async with (
        setup(tmp_path, backend) as s,
        s.daemon("server", s.server_toml(MUX + "\nproxy_protocol = true")) as server,
        s.daemon("client", s.client_toml(port(server), MUX)) as client,
    ):
        for i in range(3):
            assert await transfer(port(client), b"x%d" % i) == b"x%d" % i
    assert len(backend.heads) == 3
    for head in backend.heads:
        tlvs = parse_tlvs(head[16 + 12 :])
        assert tlvs[PP2_TYPE_QKDPROXY_PEER] == b"spiffe://qkdproxy.test/tunnel/client"


async def test_allow_list_applies_to_each_stream(tmp_path: Path) -> None:
    async with (
        setup(tmp_path) as s,
        s.daemon("server", s.server_toml(MUX)) as server,
        s.daemon("client", s.client_toml(port(server), MUX)) as client,
    ):
        assert await transfer(port(client), b"allowed") == b"allowed"
        outsider_only = s.server_toml(MUX, allow="uri:spiffe://qkdproxy.test/someone-else")
        (tmp_path / "server.toml").write_text(outsider_only)
        assert server.reload() == []
        assert await transfer(port(client), b"refused now") == b""
    refused = [r for r in s.records if r.role == "server" and r.mux == "stream"]
    assert refused[-1].reason == "rejected: peer not allowed"
    assert any(r.role == "client" and "status 403" in r.reason for r in s.records)


async def test_multiplexing_changes_need_a_restart(tmp_path: Path) -> None:
    async with setup(tmp_path) as s, s.daemon("server", s.server_toml()) as server:
        (tmp_path / "server.toml").write_text(s.server_toml(MUX))
        assert server.reload() == ["tunnel t: multiplex and mux_* changes need a restart"]


async def test_a_peer_without_the_mux_protocol_gets_one_connection_per_connection(
    tmp_path: Path,
) -> None:
    async with (
        setup(tmp_path) as s,
        s.daemon("server", s.server_toml()) as server,
        s.daemon("client", s.client_toml(port(server), MUX)) as client,
    ):
        for i in range(3):
            assert await transfer(port(client), b"plain %d" % i) == b"plain %d" % i
        await asyncio.wait_for(client.tunnels[0].wait_idle(), 10)
        assert client.tunnels[0].keys.ledger.taken >= 3
    lines = [r for r in s.records if r.role == "client"]
    assert [r.mux for r in lines] == [None, None, None]
    assert all(r.reason == "closed" for r in lines)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110 - state of other tasks, polled in a test
            await asyncio.sleep(0.02)


async def test_rotation_under_load_loses_nothing(tmp_path: Path) -> None:
    rotating = MUX + "\nmux_rotate_s = 0.4"
    async with (
        setup(tmp_path) as s,
        s.daemon("server", s.server_toml(rotating)) as server,
        s.daemon("client", s.client_toml(port(server), rotating)) as client,
    ):
        pool = client.tunnels[0].pool
        assert pool is not None
        await wait_for(lambda: len(pool.tunnels) == 1)
        baseline = open_fds()
        moved = 0

        async def worker() -> None:
            nonlocal moved
            # Load until three rotations happened, not for a fixed time: on a loaded
            # machine each establishment takes longer, and a fixed window saw two.
            while pool.rotations < 3:
                payload = os.urandom(20_000)
                answer = await transfer(port(client), payload)
                assert hashlib.sha256(answer).digest() == hashlib.sha256(payload).digest()
                moved += len(payload)

        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(8))), 30)
        await wait_for(lambda: not pool.draining and len(pool.tunnels) == 1)
        await wait_for(lambda: open_fds() <= baseline)
    streams = [r for r in s.records if r.mux == "stream"]
    assert moved and all(r.reason == "closed" for r in streams), [
        (r.role, r.reason) for r in streams if r.reason != "closed"
    ]
    tunnels = [r for r in s.records if r.mux == "tunnel" and r.role == "client"]
    assert all(not r.reason.startswith("error") for r in tunnels), [r.reason for r in tunnels]


class Relay:
    """Forwards TCP both ways until frozen: then it neither forwards nor closes (a peer
    that died without a word, or a black-holed path)."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.frozen = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)

        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(65536):
                if self.frozen.is_set():
                    await asyncio.Event().wait()
                dst.write(data)
                await dst.drain()

        with contextlib.suppress(Exception):
            await asyncio.gather(copy(reader, up_writer), copy(up_reader, writer))


async def test_a_dead_peer_is_found_by_keepalives(tmp_path: Path) -> None:
    fast = "multiplex = true\nmux_keepalive_s = 0.6"
    async with setup(tmp_path) as s, s.daemon("server", s.server_toml(fast)) as server:
        relay = Relay(port(server))
        relay_server = await asyncio.start_server(relay.handle, "127.0.0.1", 0)
        relay_port = relay_server.sockets[0].getsockname()[1]
        try:
            async with s.daemon("client", s.client_toml(relay_port, fast)) as client:
                reader, writer = await asyncio.open_connection("127.0.0.1", port(client))
                writer.write(b"ping")
                assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"
                relay.frozen.set()
                started = asyncio.get_running_loop().time()
                with pytest.raises(ConnectionResetError):
                    await asyncio.wait_for(reader.read(), 10)
                found_after = asyncio.get_running_loop().time() - started
                writer.close()
        finally:
            relay_server.close()
    assert found_after < 3.0
    dead = [r for r in s.records if r.mux == "tunnel" and r.role == "client"]
    assert any("dead peer" in r.reason for r in dead), [r.reason for r in dead]


def test_multiplexing_keys_load_and_are_checked(tmp_path: Path) -> None:
    text = KME + CLIENT + "multiplex = true\nmux_pool_min = 2\nmux_pool_max = 3\n"
    [tunnel] = load_config(write(tmp_path, text)).tunnels
    assert tunnel.mux == MuxSettings(enabled=True, pool_min=2, pool_max=3)
    assert load_config(write(tmp_path, KME + CLIENT)).tunnels[0].mux.enabled is False
    found = problems(
        tmp_path,
        KME + CLIENT + "mux_pool_min = 5\nmux_pool_max = 2\nmux_max_streams = 100000\n"
        "mux_keepalive_s = -1\nmux_rotate_second = 3\n",
    )
    assert any("mux_pool_min: must not exceed mux_pool_max (2)" in p for p in found)
    assert any("mux_max_streams: must be at most 1000" in p for p in found)
    assert any("mux_keepalive_s: must be positive or 0 (off)" in p for p in found)
    assert any("mux_rotate_second: unknown key" in p for p in found)


async def test_qkd_preferred_connections_fall_back_while_the_pool_cannot_establish(
    tmp_path: Path,
) -> None:
    preferred = 'policy = "qkd-preferred"\ngroups = ["qkd_mlkem768", "X25519MLKEM768"]\n' + MUX
    async with setup(tmp_path) as s, s.daemon("server", s.server_toml(preferred)) as server:
        # Our KME is unreachable: the pool cannot establish a tunnel with a QKD key.
        text = s.client_toml(port(server), preferred).replace(
            s.pair.urls_014[0], "https://127.0.0.1:1"
        )
        async with s.daemon("client", text) as client:
            for i in range(2):
                assert await transfer(port(client), b"pq only %d" % i) == b"pq only %d" % i

            def carried() -> list[ConnectionRecord]:
                return [r for r in s.records if r.role == "client" and r.reason == "closed"]

            async def both_ended() -> bool:
                return len(carried()) == 2

            # The application saw its echo before the client daemon finished the tunnel's
            # close: stopping the daemon now would record the second one as "drained".
            await eventually(both_ended, "both connections' lines")
    lines = carried()
    assert len(lines) == 2
    assert all(r.fallback and r.group == "X25519MLKEM768" and r.mux is None for r in lines)
    # Per-connection dials never offer the mux protocol: the server ran qkdproxy/1.
    assert all(r.mux is None for r in s.records if r.role == "server")


class HoldingBackend(Backend):
    """Answers the first connection, then holds every later one open until released,
    counting how many it holds at once."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.held = 0
        self.peak = 0
        self.release = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.total += 1
        if self.total == 1:
            await Backend.handle(self, reader, writer)
            return
        self.held += 1
        self.peak = max(self.peak, self.held)
        try:
            # Held until released, or until the daemon closes its side.
            closed = asyncio.ensure_future(reader.read(-1))
            released = asyncio.ensure_future(self.release.wait())
            await asyncio.wait({closed, released}, return_when=asyncio.FIRST_COMPLETED)
            for waiter in (closed, released):
                waiter.cancel()
        finally:
            self.held -= 1
            writer.close()


async def test_open_then_reset_streams_cannot_exceed_the_stream_limit(tmp_path: Path) -> None:
    """An authenticated but hostile client daemon opens CONNECT streams and resets each at
    once ("Rapid Reset"): h2 frees the slot, but the server's handlers still dial the
    backend. They are capped at mux_max_streams; the rest are refused without a dial."""
    backend = HoldingBackend()
    limited = "multiplex = true\nmux_keepalive_s = 5\nmux_max_streams = 10"
    async with (
        setup(tmp_path, backend) as s,
        s.daemon("server", s.server_toml(limited)) as server,
        s.daemon("client", s.client_toml(port(server), limited)) as client,
    ):
        assert await transfer(port(client), b"hello") == b"hello"
        pool = client.tunnels[0].pool
        assert pool is not None
        tunnel = pool.tunnels[0]
        conn = tunnel.conn
        for _ in range(4):
            for _ in range(50):
                conn.reset(conn.open_stream(), ResetCode.CANCEL)
            await tunnel.flush()
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # let the server act on every frame it was sent
        assert backend.peak <= 10, (backend.peak, backend.total)
        assert backend.total <= 11, backend.total
        backend.release.set()


class GatheringBackend(Backend):
    """Echoes only once ``wanted`` connections are open at the same time."""

    def __init__(self, wanted: int) -> None:
        super().__init__()
        self.wanted = wanted
        self.open = 0
        self.all_open = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open += 1
        if self.open >= self.wanted:
            self.all_open.set()
        await asyncio.wait_for(self.all_open.wait(), 20)
        await Backend.handle(self, reader, writer)


@pytest.mark.parametrize("pool_max", [4, 1])
async def test_a_client_above_the_server_stream_limit_opens_tunnels_or_queues(
    tmp_path: Path, pool_max: int
) -> None:
    """The client allows 100 streams per tunnel, the server 4: the client keeps to the
    server's limit (it waits for its SETTINGS), so no tunnel ends in TooManyStreams and no
    stream fails. With room for more tunnels it opens them; without, connections queue."""
    connections = 10
    backend = GatheringBackend(connections if pool_max == 4 else 1)
    server_side = "multiplex = true\nmux_keepalive_s = 5\nmux_max_streams = 4"
    client_side = f"multiplex = true\nmux_max_streams = 100\nmux_pool_max = {pool_max}"
    async with (
        setup(tmp_path, backend) as s,
        s.daemon("server", s.server_toml(server_side)) as server,
        s.daemon("client", s.client_toml(port(server), client_side)) as client,
    ):
        payloads = [os.urandom(20_000 + i) for i in range(connections)]
        got = await asyncio.gather(*(transfer(port(client), p) for p in payloads))
        assert got == payloads
        pool = client.tunnels[0].pool
        assert pool is not None
        carriers = [*pool.tunnels, *pool.draining]
        assert len(carriers) == (3 if pool_max == 4 else 1)
        assert all(t.conn.capacity <= 4 for t in carriers)
    streams = [r for r in s.records if r.mux == "stream"]
    assert len(streams) == 2 * connections
    assert all(r.reason == "closed" for r in streams), {r.reason for r in streams}
    tunnels = [r for r in s.records if r.mux == "tunnel"]
    assert not any("TooManyStreams" in str(r.reason) for r in tunnels), tunnels
