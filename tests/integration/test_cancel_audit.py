"""Connections cut while they close, between real daemons: what the clean-up still owes.

On a second SIGTERM the daemon cancels its drain, and with it every connection the drain
deadline had cut and that was still closing; a connection can also be cut before its pump
began. Each clean-up step must then still happen: a cut upload reaches the backend as a
reset (never as nothing, its socket left open, or as a FIN that passes for its end), a
multiplexed tunnel's line still says what it carried, and the peer's socket of a client
connection cut before its pump (announcing its keys, or sending the alert of a failed
handshake) goes with the connection.

A close that waits for a peer that stopped reading is played by one that waits until it
is cut, for the closes the tunnel's own connection tasks make (whichever module's close).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path

import pytest

from qkdproxy.core.tls.connection import Phase, TlsConnection
from qkdproxy.daemon import muxconn as muxconn_module
from qkdproxy.daemon.app import Daemon
from qkdproxy.daemon.pump import Channel
from qkdproxy.daemon.tunnel import Tunnel
from qkdproxy.io import tls_stream as tls_stream_module
from qkdproxy.io.tls_stream import TlsStream, close_transport
from tests.integration.test_cut_ends import ANSWER, UPLOAD, Holding, half_done
from tests.integration.test_tunnel_runtime import Setup, port, setup
from tests.system_helpers import eventually
from tests.unit.test_cancel_audit import forever


class ClosingUntilCut:
    """``close_transport`` as the connection tasks of ``tunnel`` see it when their peers
    never release the socket: it waits until cut. Any other close is the real one."""

    def __init__(self, tunnel: Tunnel) -> None:
        self.tunnel = tunnel
        self.entered = asyncio.Event()

    async def close(
        self, writer: asyncio.StreamWriter, *, dropping: Callable[[int], None] | None = None
    ) -> None:
        if asyncio.current_task() in self.tunnel._connections:
            self.entered.set()
            writer.close()
            await forever()
        await close_transport(writer, dropping=dropping)


async def cut_twice(tunnel: Tunnel, closing: ClosingUntilCut) -> None:
    """Drain ``tunnel`` with a short deadline, and once a cut connection is in its close,
    cancel the drain (the second SIGTERM)."""
    tunnel.stop_accepting()
    drain = asyncio.ensure_future(tunnel.drain(0.05))
    await closing.entered.wait()
    drain.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await drain


async def cut_ends_peer(tunnel: Tunnel, server: Daemon) -> None:
    """Cut the client ``tunnel``'s one connection at once: the server's end of it ends
    too. Its socket is closed by the cut, not left to the garbage collector (whose close
    is a ResourceWarning, an error in this suite; until then the server's end lives on)."""
    tunnel.stop_accepting()
    assert await tunnel.drain(0) == 1

    async def gone() -> bool:
        return server.tunnels[0].active == 0

    await eventually(gone, "the server's end of the cut connection")


def accounted(s: Setup, daemon: Daemon) -> None:
    """Every connection the daemon's tunnel opened has its line and was counted closed."""
    tunnel = daemon.tunnels[0]
    lines = [r for r in s.records if r.role == tunnel.config.role]
    assert tunnel.stats.opened > 0
    assert tunnel.stats.closed == tunnel.stats.opened == len(lines)
    assert all(r.reason for r in lines), [r.reason for r in lines]


@pytest.mark.parametrize(
    ("upload", "end"), [(UPLOAD, "reset"), (b"", "eof")], ids=["upload", "nothing"]
)
async def test_a_connection_cut_again_while_its_tls_side_closes_still_ends_its_backend(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, upload: bytes, end: str
) -> None:
    backend = Holding()  # never answers: the server's close of the TLS side is a close_notify
    async with (
        setup(tmp_path, backend) as s,
        s.daemon("server", s.server_toml()) as server,
        s.daemon("client", s.client_toml(port(server))) as client,
    ):
        _, writer = await asyncio.open_connection("127.0.0.1", port(client))
        writer.write(upload)
        await writer.drain()

        async def uploaded() -> bool:
            return bool(backend.received) and bytes(backend.received[0]) == upload

        await eventually(uploaded, "the backend connected (and the upload there)")
        closing = ClosingUntilCut(server.tunnels[0])
        monkeypatch.setattr(tls_stream_module, "close_transport", closing.close)
        await cut_twice(server.tunnels[0], closing)

        async def ended() -> bool:
            return bool(backend.ends)

        # Not left open (until the garbage collector closes it); a cut upload is reset (a
        # FIN would pass for its end), a connection that moved nothing closed.
        await eventually(ended, "the backend's connection ended")
        assert backend.ends == [end]
        writer.close()
        backend.let_go()
    accounted(s, server)


async def test_a_tunnel_cut_again_while_closing_still_says_what_it_carried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = Holding(answer=ANSWER)
    async with half_done(tmp_path, backend, "multiplexed") as (s, server, _, _, writer):
        closing = ClosingUntilCut(server.tunnels[0])
        monkeypatch.setattr(muxconn_module, "close_transport", closing.close)
        await cut_twice(server.tunnels[0], closing)
        writer.close()
        backend.let_go()
    tunnels = [r for r in s.records if r.role == "server" and r.mux == "tunnel"]
    # Its streams, key updates and fresh keys' ids: where the tunnel's keys went.
    assert [r.mux_streams for r in tunnels] == [1]
    accounted(s, server)


async def test_a_connection_cut_before_its_pump_closes_its_peer_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = Holding()
    async with (
        setup(tmp_path, backend) as s,
        s.daemon("server", s.server_toml()) as server,
        s.daemon("client", s.client_toml(port(server))) as client,
    ):
        tunnel = client.tunnels[0]
        announcing = asyncio.Event()

        async def announce_unread(stream: TlsStream) -> Channel:
            announcing.set()  # the handshake is done; the announcement waits for the peer
            await forever()
            raise AssertionError("never reached")

        monkeypatch.setattr(tunnel, "_peer_channel", announce_unread)
        _, writer = await asyncio.open_connection("127.0.0.1", port(client))
        writer.write(UPLOAD)
        await writer.drain()
        await announcing.wait()
        await cut_ends_peer(tunnel, server)
        writer.close()
        backend.let_go()
    accounted(s, client)


async def test_a_dial_cut_while_sending_its_failure_alert_closes_its_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with (
        setup(tmp_path) as s,
        s.daemon("server", s.server_toml()) as server,
        s.daemon("client", s.client_toml(port(server)).replace("server.", "other.")) as client,
    ):
        flush = tls_stream_module._flush
        alerting = asyncio.Event()

        async def alert_unread(conn: TlsConnection, writer: asyncio.StreamWriter) -> None:
            # The client's: the server's name was not the one it dialled.
            if conn.phase is Phase.FAILED and writer.get_extra_info("peername")[1] == port(server):
                alerting.set()
                await forever()
            await flush(conn, writer)

        monkeypatch.setattr(tls_stream_module, "_flush", alert_unread)
        _, writer = await asyncio.open_connection("127.0.0.1", port(client))
        await alerting.wait()
        await cut_ends_peer(client.tunnels[0], server)
        writer.close()
    accounted(s, client)
