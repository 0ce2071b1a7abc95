"""close_transport over real loopback sockets, on asyncio's loop and on uvloop: a close
with nothing left in the transport waits without a timeout scope, so it must never wait
on the peer. A peer that never reads (its kernel buffers full, ours empty), a transport
already closing, a half-closed one, one read by a SocketReader: each close ends and
releases the socket; what the kernel still holds is delivered, not dropped. With bytes
left in the transport the close stays bounded."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, cast

import pytest
import uvloop

from qkdproxy.daemon.muxconn import MuxTunnel
from qkdproxy.daemon.pump import RekeyBudget
from qkdproxy.io import socket_reader, tls_stream
from qkdproxy.io.tls_stream import close_transport
from tests.integration.test_eku_attack import stream_pair
from tests.unit.test_cancel_audit import backed_up, unread
from tests.unit.test_mux_hostile import client

LOOPS = ("asyncio", "uvloop")
# Only a bound for a hang, should the close wait on the peer: never reached when it works.
HANG = 30.0


def run(loop: str, scenario: Callable[[], Awaitable[None]]) -> None:
    if loop == "uvloop":
        uvloop.run(scenario())  # type: ignore[arg-type]
    else:
        asyncio.run(scenario())  # type: ignore[arg-type]


@asynccontextmanager
async def stuck_peer() -> AsyncIterator[tuple[socket.socket, socket.socket]]:
    """(ours, theirs): a connected TCP pair; the test's peer (theirs) reads nothing until
    told to, and ours is non-blocking, ready for a transport."""
    listener = socket.create_server(("127.0.0.1", 0))
    ours = socket.create_connection(listener.getsockname())
    theirs, _ = listener.accept()
    listener.close()
    for sock in (ours, theirs):
        # Small buffers: the pipe fills with little.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    ours.setblocking(False)
    try:
        yield ours, theirs
    finally:
        ours.close()
        theirs.close()


def fill_kernel(sock: socket.socket) -> bytes:
    """Send until the kernel takes no more (the peer reads nothing): what went out."""
    sent = bytearray()
    chunk = b"x" * 4096
    while True:
        try:
            count = sock.send(chunk)
        except BlockingIOError:
            return bytes(sent)
        sent += chunk[:count]


async def drain_all(theirs: socket.socket) -> bytes:
    """Everything the peer gets until the end (read off the loop: a blocking socket)."""
    loop = asyncio.get_running_loop()

    def read() -> bytes:
        got = bytearray()
        theirs.settimeout(HANG)
        while data := theirs.recv(65536):
            got += data
        return bytes(got)

    return await loop.run_in_executor(None, read)


async def open_on(ours: socket.socket, how: str) -> asyncio.StreamWriter:
    if how == "socket_reader":
        reader, writer = await asyncio.open_connection(sock=ours)
        socket_reader.SocketReader.attach(reader, writer, 65536)
        return writer
    return (await asyncio.open_connection(sock=ours))[1]


@pytest.mark.parametrize("how", ["stream", "socket_reader"])
@pytest.mark.parametrize("loop", LOOPS)
def test_a_close_with_the_kernel_full_and_our_buffer_empty_does_not_wait_for_the_peer(
    loop: str, how: str
) -> None:
    async def scenario() -> None:
        async with stuck_peer() as (ours, theirs):
            queued = fill_kernel(ours)
            writer = await open_on(ours, how)
            assert writer.transport.get_write_buffer_size() == 0
            await asyncio.wait_for(close_transport(writer), HANG)
            assert writer.transport.is_closing()
            assert ours.fileno() == -1 or writer.get_extra_info("socket").fileno() == -1
            # A graceful close: what the kernel held still reaches the peer, then the end.
            assert await drain_all(theirs) == queued

    run(loop, scenario)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_close_with_bytes_left_for_a_peer_that_never_reads_is_bounded(
    loop: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tls_stream, "CLOSE_TIMEOUT", 0.05)

    async def scenario() -> None:
        async with stuck_peer() as (ours, _theirs):
            fill_kernel(ours)
            reader, writer = await asyncio.open_connection(sock=ours)
            writer.write(b"y" * 200_000)
            assert writer.transport.get_write_buffer_size() > 0
            await asyncio.wait_for(close_transport(writer), HANG)
            assert writer.transport.is_closing()
            # Aborted: nothing waits for the peer, and a second close (a failed stream's
            # own, then its owner's) ends as well, without a cancellation nobody asked for.
            await asyncio.wait_for(close_transport(writer), HANG)
            await asyncio.sleep(0)  # the next wait runs: no cancellation is pending
            # The connection is gone (uvloop lets it go a round after the abort).
            assert await asyncio.wait_for(reader.read(), HANG) == b""

    run(loop, scenario)


@pytest.mark.parametrize("state", ["closing", "closed", "half_closed", "peer_gone"])
@pytest.mark.parametrize("loop", LOOPS)
def test_a_close_of_a_transport_already_ending_ends(loop: str, state: str) -> None:
    async def scenario() -> None:
        async with stuck_peer() as (ours, theirs):
            writer = await open_on(ours, "stream")
            writer.write(b"last")
            if state == "closing":
                writer.close()
            elif state == "closed":
                writer.close()
                await writer.wait_closed()
            elif state == "half_closed":
                writer.write_eof()
            else:
                theirs.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                )
                theirs.close()
            await asyncio.wait_for(close_transport(writer), HANG)
            assert writer.transport.is_closing()

    run(loop, scenario)


async def test_a_stream_closed_past_a_peer_that_stopped_reading_can_be_closed_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A multiplexing tunnel closes its TLS stream, then its socket once its tasks ended.
    The peer stopped reading, so the stream's close ran out of time and aborted: the second
    close ends too, rather than raising a cancellation nobody asked for (out of a pool's
    close, it would leave the pool's other tunnels open)."""
    monkeypatch.setattr(tls_stream, "CLOSE_TIMEOUT", 0.05)
    async with stream_pair() as s:
        peer = cast(asyncio.Transport, s.server._driver.writer.transport)
        peer.pause_reading()  # the peer reads no more
        writer = s.client._driver.writer
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        while writer.transport.get_write_buffer_size() < 16 << 20:  # past any kernel buffer
            s.client._layer.send_data(b"z" * 16_000)
            s.client._transmit()
        await asyncio.wait_for(s.client.close(), HANG)
        await asyncio.wait_for(close_transport(writer), HANG)
        await asyncio.sleep(0)  # the next wait runs: no cancellation is pending
        assert writer.transport.is_closing()


class ClosingTls:
    """A multiplexing tunnel's TLS stream whose close ends as the real one's does against a
    peer that stopped reading: its transport's close runs out of time."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer

    def write_nowait(self, data: bytes | bytearray) -> bool:
        return True

    async def drain(self) -> None:
        pass

    async def close(self) -> None:
        await close_transport(self.writer)


async def test_a_tunnel_closed_past_a_peer_that_stopped_reading_ends_its_close(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The multiplexing tunnel's close: its TLS stream's close, then its socket's. A pool
    closes its tunnels one after another: a cancellation out of one would leave the rest."""
    monkeypatch.setattr(tls_stream, "CLOSE_TIMEOUT", 0.05)
    async with unread() as writer:
        backed_up(writer)
        tunnel = MuxTunnel(
            cast(Any, ClosingTls(writer)), writer, client(), keepalive_s=0, rekey=RekeyBudget()
        )
        await asyncio.wait_for(tunnel.close(), HANG)
        await asyncio.sleep(0)  # the next wait runs: no cancellation is pending
        assert writer.transport.is_closing()
