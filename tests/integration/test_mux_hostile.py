"""A hostile (authenticated) peer daemon against a real server's multiplexed tunnel, and the
tunnel window under refused streams (real daemons, real sockets, real KME simulator).

The hostile peer is our own client daemon with raw frames slipped into its tunnel's
protocol output: the server cannot tell it from a compromised qkdproxy."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from qkdproxy.daemon.app import Daemon
from qkdproxy.daemon.muxconn import MuxTunnel
from qkdproxy.daemon.tunnel import Tunnel
from qkdproxy.tools.bench.processes import free_port
from tests.integration.test_mux import MUX
from tests.integration.test_tunnel_runtime import Backend, Setup, port, setup, transfer
from tests.unit.test_mux_codec import CONNECT, frame

HEADERS, PING, END_HEADERS = 1, 6, 0x4


def pooled(tunnel: Tunnel) -> MuxTunnel:
    assert tunnel.pool is not None and tunnel.pool.tunnels
    return tunnel.pool.tunnels[0]


async def inject(carrier: MuxTunnel, raw: bytes) -> None:
    """Frames as a compromised peer would send them, in order with the protocol's own."""
    carrier.conn._out += raw
    await carrier._write_now()


@asynccontextmanager
async def carrying_pair(
    tmp_path: Path,
) -> AsyncIterator[tuple[Setup, Daemon, Daemon, MuxTunnel]]:
    """A multiplexed server and client daemon that carried one stream: the set-up (its
    records), both daemons and the client's tunnel the hostile frames go into."""
    async with (
        setup(tmp_path) as s,
        s.daemon("server", s.server_toml(MUX)) as server,
        s.daemon("client", s.client_toml(port(server), MUX)) as client,
    ):
        assert await transfer(port(client), b"first") == b"first"
        yield s, server, client, pooled(client.tunnels[0])


async def test_refused_streams_do_not_shut_the_tunnel_window(tmp_path: Path) -> None:
    """The backend is down: each stream is refused (502) after the server buffered what the
    client sent right behind its CONNECT. Those bytes must go back to the tunnel window,
    or the tunnel (2 MiB of window at two streams) is shut for good once the backend is
    back: the next stream's data can never be sent."""
    backend_port = free_port()
    two = "multiplex = true\nmux_keepalive_s = 5\nmux_max_streams = 2"
    async with setup(tmp_path) as s:
        text = s.server_toml(two).replace(f':{s.backend_port}"', f':{backend_port}"')
        async with (
            s.daemon("server", text) as server,
            s.daemon("client", s.client_toml(port(server), two)) as client,
        ):

            async def refused() -> None:
                with contextlib.suppress(ConnectionError):
                    assert await transfer(port(client), bytes(900 * 1024)) == b""

            for _ in range(8):
                await asyncio.gather(refused(), refused())
            backend = await asyncio.start_server(Backend().handle, "127.0.0.1", backend_port)
            try:
                carrier = pooled(client.tunnels[0])
                got = await asyncio.wait_for(transfer(port(client), b"back again"), 10)
                assert got == b"back again"
                assert pooled(client.tunnels[0]) is carrier  # the same tunnel carried it
            finally:
                backend.close()
    refusals = [r for r in s.records if r.role == "server" and r.mux == "stream"]
    assert sum(r.reason.startswith("backend unreachable") for r in refusals) == 16, refusals


async def test_a_header_block_bomb_ends_only_that_tunnel(tmp_path: Path) -> None:
    async with carrying_pair(tmp_path) as (s, _, client, carrier):
        spam = b"\x20" * (100 * 1024) + CONNECT  # table size updates: no header at all
        await inject(carrier, frame(HEADERS, END_HEADERS, 99, spam))
        await asyncio.wait_for(carrier.ended.wait(), 10)
        # The server sent GOAWAY and reset the transport; a new tunnel carries on.
        assert await transfer(port(client), b"second") == b"second"
    ended = [r for r in s.records if r.role == "server" and r.mux == "tunnel"]
    assert any("header block too large" in r.reason for r in ended), [r.reason for r in ended]


async def test_a_ping_flood_from_a_peer_that_never_reads_is_bounded(tmp_path: Path) -> None:
    """Every PING is answered, but the answers leave only as fast as the peer reads: the
    server stops reading while its transport is backed up, so neither its protocol buffer
    nor its transport buffer grows with the flood."""
    async with carrying_pair(tmp_path) as (_, server, _, carrier):
        for task in carrier._tasks:  # the hostile peer reads nothing from here on
            task.cancel()
        [victim] = server.tunnels[0]._mux_tunnels
        flood = frame(PING, 0, 0, bytes(8)) * 30_000  # 510 KB per write, 64 MiB in all
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                for _ in range(128):
                    await inject(carrier, flood)
        queued = len(victim.conn._out) + victim._writer.transport.get_write_buffer_size()
        assert queued < 4 << 20, queued
        assert victim.alive
        carrier._break("test over")


async def test_stream_ids_are_not_reused_by_a_hostile_client(tmp_path: Path) -> None:
    async with carrying_pair(tmp_path) as (s, _, client, carrier):
        await inject(carrier, frame(HEADERS, END_HEADERS, 1, CONNECT))  # stream 1 again
        await asyncio.wait_for(carrier.ended.wait(), 10)
        assert await transfer(port(client), b"second") == b"second"
    ended = [r.reason for r in s.records if r.role == "server" and r.mux == "tunnel"]
    assert any("HEADERS out of place on 1" in r for r in ended), ended
    # Every stream the server carried has its own line; the hostile one got none.
    streams = [r for r in s.records if r.role == "server" and r.mux == "stream"]
    assert [r.reason for r in streams] == ["closed", "closed"]
