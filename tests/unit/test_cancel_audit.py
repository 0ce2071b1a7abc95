"""Clean-ups cut part-way (the daemon stopping now: a second SIGTERM cancels the drain and
every close it waits for) still release what they hold: the socket, a stream's place in
its tunnel, a tunnel's tasks, the QKD keys a supply holds (settled, never dropped from
the books); and a cut close ends cut, never carrying on as if it had not been. Real sockets where a socket is released; the tunnel's TLS
stream is a stand-in whose drain waits until it is cut, as one to a peer that stopped
reading does.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any, cast

import pytest

from qkdproxy.core.accounting import KeyAccount
from qkdproxy.core.keys import HeldKey, QkdKey
from qkdproxy.daemon.kme_binding import KmeConnection
from qkdproxy.daemon.muxconn import MuxTunnel
from qkdproxy.daemon.pump import RekeyBudget, Traffic
from qkdproxy.daemon.tunnel import _close_stream
from qkdproxy.io.tls_stream import close_transport
from qkdproxy.keys.etsi004_supply import PrefetchingStreams
from qkdproxy.keys.etsi014_supply import Etsi014Master
from qkdproxy.keys.sources import KeySources
from tests.unit.test_mux_hostile import client


@asynccontextmanager
async def unread() -> AsyncIterator[asyncio.StreamWriter]:
    """Our end of a loopback connection whose peer never reads."""
    accepted: asyncio.Future[asyncio.StreamWriter] = asyncio.get_running_loop().create_future()

    async def keep(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set_result(writer)

    server = await asyncio.start_server(keep, "127.0.0.1", 0)
    _, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
    peer = await accepted
    try:
        yield writer
    finally:
        for transport in (writer.transport, peer.transport):
            # asyncio's own transport drops its loop once its close has ended, and an
            # abort then fails: whether a test's close got that far is not ours to know.
            with contextlib.suppress(AttributeError):
                transport.abort()
        server.close()
        await server.wait_closed()


def backed_up(writer: asyncio.StreamWriter) -> None:
    """Write until the kernel's buffers are full and the transport holds the rest."""
    chunk = bytes(1 << 20)
    while not writer.transport.get_write_buffer_size():
        writer.write(chunk)


async def test_a_close_cut_while_waiting_for_the_peer_releases_the_socket() -> None:
    async with unread() as writer:
        backed_up(writer)
        waiting = asyncio.Event()
        wait_closed = writer.wait_closed

        async def marked() -> None:
            waiting.set()
            await wait_closed()

        writer.wait_closed = marked  # type: ignore[method-assign]
        closing = asyncio.ensure_future(close_transport(writer))
        await waiting.wait()  # closed, and waiting for the peer to take what is left
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
        # Reset (the socket goes in the loop's next round), not left closing, for as long
        # as the peer does not read, behind what it will never read.
        assert writer.transport.get_write_buffer_size() == 0


async def forever() -> None:
    """Wait until cut."""
    await asyncio.Event().wait()


class StuckTls:
    """A tunnel's TLS stream whose transport never drains (its peer stopped reading)."""

    def __init__(self) -> None:
        self.waiting = asyncio.Event()
        self.aborted: str | None = None

    def write_nowait(self, data: bytes | bytearray) -> bool:
        return False

    async def drain(self) -> None:
        self.waiting.set()
        await forever()

    def abort(self, reason: str) -> None:
        self.aborted = reason

    async def close(self) -> None:
        await self.drain()


def stuck_tunnel(writer: Any = None) -> tuple[MuxTunnel, StuckTls]:
    tls = StuckTls()
    tunnel = MuxTunnel(cast(Any, tls), writer, client(), keepalive_s=0, rekey=RekeyBudget())
    return tunnel, tls


async def test_a_stream_closed_while_its_end_waits_for_the_tunnel_still_leaves_it() -> None:
    tunnel, tls = stuck_tunnel()
    stream = tunnel.open_stream()
    closing = asyncio.ensure_future(stream.close())
    await tls.waiting.wait()  # END_STREAM handed to TLS, which waits for the peer
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    # Otherwise the tunnel counts it for ever: never idle, so never drained or retired.
    assert stream.done
    assert not tunnel.streams
    assert (tunnel.active, tunnel.senders) == (0, 0)


async def test_a_stream_cut_again_while_resetting_still_resets_its_plaintext_side() -> None:
    tunnel, tls = stuck_tunnel()
    stream = tunnel.open_stream()
    traffic = Traffic(to_peer=len(b"part of an upload"))
    async with unread() as plaintext:
        # The drain deadline cut the pump (no reason); RST_STREAM waits for the peer.
        closing = asyncio.ensure_future(_close_stream(None, traffic, stream, plaintext, 0))
        await tls.waiting.wait()
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
        # Reset, not left for a close that would send the application a FIN.
        assert plaintext.transport.is_closing()


async def test_a_tunnel_cut_while_closing_cleanly_stops_its_tasks_and_resets() -> None:
    async with unread() as writer:
        tunnel, tls = stuck_tunnel(writer)
        tunnel._spawn(forever())  # its reader, say
        [task] = tunnel._tasks
        closing = asyncio.ensure_future(tunnel.close())
        await tls.waiting.wait()  # the GOAWAY waits for the peer
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
        assert tls.aborted is not None  # an unfinished update's key is settled
        assert writer.transport.is_closing()
        await writer.wait_closed()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_a_tunnel_cut_while_its_tasks_end_still_closes_its_socket() -> None:
    async with unread() as writer:
        tunnel, _ = stuck_tunnel(writer)
        ending, release = asyncio.Event(), asyncio.Event()

        async def slow_to_end() -> None:
            try:
                await forever()
            finally:
                ending.set()
                await release.wait()

        tunnel._spawn(slow_to_end())
        tunnel._end("closed", broken=False)  # ended: closing only waits for its tasks
        closing = asyncio.ensure_future(tunnel.close())
        await ending.wait()
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
        assert writer.is_closing()
        release.set()


# ---------------------------------------------------------------- KME supplies, at close


def slow_to_end() -> tuple[asyncio.Task[None], asyncio.Event]:
    """A background task (a refill, a status poll) whose end, once cut, takes a while;
    the event is set once it is ending."""
    ending = asyncio.Event()

    async def work() -> None:
        try:
            await forever()
        finally:
            ending.set()
            await forever()

    return asyncio.ensure_future(work()), ending


async def cut_when(closing: Coroutine[Any, Any, None], ready: asyncio.Event) -> None:
    """Run ``closing``, cut it once ``ready`` is set: it must end cut, not carry on."""
    task = asyncio.ensure_future(closing)
    await ready.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_master_supply_cut_while_closing_settles_its_keys_and_stays_cut() -> None:
    account = KeyAccount()
    master = Etsi014Master(cast(Any, None), "sae-b", account=account)
    master._buffer.append(HeldKey(QkdKey(bytes(16), bytes(32)), 0.0))
    account.draw()
    master._refill, ending = slow_to_end()
    await cut_when(master.aclose(), ending)
    assert account.fates["stranded"] == 1
    assert account.held == 0


async def test_a_kme_connection_cut_while_its_poll_ends_stays_cut() -> None:
    kme = KmeConnection(cast(Any, None), KeySources(), cast(Any, None))
    kme._poller, ending = slow_to_end()
    await cut_when(kme.aclose(), ending)


class StreamsClosingUntilCut:
    """An ETSI 004 application whose CLOSE waits for a KME that does not answer."""

    def __init__(self) -> None:
        self.closing = asyncio.Event()
        self.opened = 0

    async def open(self, ksid: bytes | None) -> bytes:
        self.opened += 1
        return ksid or bytes([self.opened]) * 16

    async def get_key(self, ksid: bytes, index: int) -> bytes:
        return bytes(32)

    async def close(self, ksid: bytes) -> None:
        self.closing.set()
        await forever()


async def test_streams_cut_while_closing_still_settle_the_keys_they_hold() -> None:
    account = KeyAccount()
    inner = StreamsClosingUntilCut()
    streams = PrefetchingStreams(inner, pool=1, account=account)
    streams.ensure_refill()  # one stream of ours open ahead (closed at the end)
    await streams.wait_idle()
    streams.announced(streams.announce(1))  # acknowledged by the peer: key 0 fetched ahead
    await streams.wait_idle()
    assert account.held == 1
    await cut_when(streams.aclose(), inner.closing)
    assert account.fates["stranded"] == 1
    assert account.held == 0
