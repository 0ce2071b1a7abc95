"""A connection line's ``bytes_to_peer`` never counts what our reset of the TLS side
dropped (real daemons, real sockets, on both event loops the daemon runs on).

The path between the daemons stops reading in the middle of a large upload: the client
daemon's transport buffer and its socket's send queue fill with records the peer never
acknowledged. The client's idle timeout then resets the TLS side, which drops them. The
relay standing for the server's host afterwards reads all that reached it and hands it
on, so the server opens every record that left: what it received as plaintext is the
figure the client's line must not exceed.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path

import pytest

from qkdproxy.core.tls.records import MAX_PLAINTEXT
from qkdproxy.io import tls_stream
from tests.integration.test_cut_ends import IDLE, Holding
from tests.integration.test_data_path_attack import run
from tests.integration.test_eku_attack import stream_pair
from tests.integration.test_records import read_until_failure
from tests.integration.test_tunnel_runtime import port, setup
from tests.system_helpers import eventually

# Far more than the socket buffers and the transports on the way hold (Linux: 4 MiB of
# send queue at most by default).
UPLOAD = 64 << 20
# What the path lets through before it stops reading.
LET_THROUGH = 2 << 20


class StallingPath:
    """The path to the server daemon: relays both ways, stops reading from the client
    once ``LET_THROUGH`` bytes went up, and on :meth:`release` reads what reached it (the
    kernel keeps it readable until the reset is read) and hands it all to the server,
    then ends that direction with FIN."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.setblocking(False)
        self.port = int(self.listener.getsockname()[1])
        self.upstream = 0
        self.ended_by: str | None = None
        self.stalled = asyncio.Event()
        self._released = asyncio.Event()

    def release(self) -> None:
        self._released.set()

    async def serve_one(self) -> None:
        loop = asyncio.get_running_loop()
        client, _ = await loop.sock_accept(self.listener)
        server = socket.create_connection(("127.0.0.1", self.target))
        client.setblocking(False)
        server.setblocking(False)
        down = asyncio.ensure_future(self._down(loop, server, client))
        try:
            await self._up(loop, client, server)
            server.shutdown(socket.SHUT_WR)
            await down
        finally:
            down.cancel()
            client.close()
            server.close()
            self.listener.close()

    async def _up(
        self, loop: asyncio.AbstractEventLoop, client: socket.socket, server: socket.socket
    ) -> None:
        try:
            while data := await loop.sock_recv(client, 65536):
                await loop.sock_sendall(server, data)
                self.upstream += len(data)
                if self.upstream >= LET_THROUGH and not self.stalled.is_set():
                    self.stalled.set()
                    await self._released.wait()
            self.ended_by = "eof"
        except ConnectionResetError:
            self.ended_by = "reset"

    async def _down(
        self, loop: asyncio.AbstractEventLoop, server: socket.socket, client: socket.socket
    ) -> None:
        with contextlib.suppress(OSError):
            while data := await loop.sock_recv(server, 65536):
                await loop.sock_sendall(client, data)


async def upload(client_port: int) -> None:
    """An application that uploads UPLOAD bytes and never ends; its connection is reset."""
    reader, writer = await asyncio.open_connection("127.0.0.1", client_port)
    with contextlib.suppress(ConnectionError):
        writer.write(bytes(UPLOAD))
        await writer.drain()
        await reader.read()
    writer.close()


# How the client cuts the connection: its idle timeout, or the drain deadline (a tunnel's
# drain with no time left, as a second SIGTERM does) with KeyUpdates between the batches
# of application records (records of another kind among those the reset drops).
CUTS = {"idle_timeout": IDLE, "drained": "rekey_bytes = 100000"}


@pytest.mark.parametrize("cut", sorted(CUTS))
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_bytes_a_reset_of_the_tls_side_dropped_are_not_counted_as_sent(
    tmp_path: Path, loop: str, cut: str
) -> None:
    """The client's idle timeout (or its drain deadline) resets a connection whose upload
    backed up behind a path that stopped reading. Its line's bytes_to_peer is at most what
    the server then opened as plaintext. After the idle second every byte that arrived is
    acknowledged, so it is short by less than one record (a record partly acknowledged
    does not count); a reset right after the path stopped reading also leaves out bytes
    that arrived unacknowledged (0.4 MB measured). Before the fix it counted every byte
    handed to the transport: megabytes that were dropped."""

    async def scenario() -> None:
        backend = Holding()
        async with setup(tmp_path, backend) as s, s.daemon("server", s.server_toml()) as server:
            path = StallingPath(port(server))
            relaying = asyncio.ensure_future(path.serve_one())
            async with s.daemon("client", s.client_toml(path.port, CUTS[cut])) as client:
                uploading = asyncio.ensure_future(upload(port(client)))
                if cut == "drained":
                    await path.stalled.wait()
                    client.tunnels[0].stop_accepting()
                    assert await client.tunnels[0].drain(0) == 1

                async def client_line() -> bool:
                    return any(r.role == "client" for r in s.records)

                await eventually(client_line, "the client's line (the cut)")
                path.release()
                await relaying

                async def server_line() -> bool:
                    return any(r.role == "server" for r in s.records)

                await eventually(server_line, "the server's line")
                await uploading
                backend.let_go()
                received = server.tunnels[0].stats.bytes_from_peer
        [line] = [r for r in s.records if r.role == "client"]
        assert path.stalled.is_set() and path.ended_by == "reset"
        assert line.reason == cut
        assert line.key_updates > 0 or cut == "idle_timeout"
        claimed = line.bytes_to_peer
        assert claimed <= received, f"{claimed - received} bytes claimed that never left"
        assert received - claimed < MAX_PLAINTEXT or cut == "drained"

    run(loop, scenario)


async def test_a_close_cut_short_counts_what_it_left_behind_as_not_delivered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A clean close whose peer stopped reading times out and aborts the transport: what
    it still held counts as not delivered. The kernel may yet deliver its queue after the
    abort (no reset), so the figure is a lower bound: never above what the peer opens."""
    monkeypatch.setattr(tls_stream, "CLOSE_TIMEOUT", 0.05)
    chunk = bytes(256 * 1024)
    async with stream_pair() as s:
        writer = s.client._driver.writer
        written = 0

        async def upload() -> None:
            nonlocal written
            while True:
                await s.client.write(chunk, application=True)
                written += len(chunk)

        uploading = asyncio.ensure_future(upload())

        async def backed_up() -> bool:
            return writer.transport.get_write_buffer_size() > 0 and not uploading.done()

        await eventually(backed_up, "the client's transport backed up")
        uploading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await uploading
        written += len(chunk)  # the batch whose drain was cut had been handed over
        await s.client.close()
        received, _ = await read_until_failure(s.server)
    delivered = s.client.delivered
    assert delivered is not None and delivered.exact
    assert delivered.count <= len(received) < written
    assert delivered.count < written - MAX_PLAINTEXT  # the buffer, at least, was dropped
