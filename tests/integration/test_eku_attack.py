"""Extended Key Update under attack and on its unhappy paths, over real loopback sockets:
a connection cut mid-update, an update's deadline while the pipe is full, the split of
failed and abandoned updates. Keys come from the in-process QKD link; deadlines are
judged with a hand-driven clock."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest

from qkdproxy.core.tls.eku_state import State
from qkdproxy.core.tls.keyexchange import QkdOptions
from qkdproxy.core.tls.wire import Alert
from qkdproxy.daemon import gate
from qkdproxy.io import tls_stream
from qkdproxy.io.tls_stream import TlsEndpoint, TlsStream, TlsStreamError
from qkdproxy.keys.context import KeyContext
from qkdproxy.tools.loopback import loopback_pair
from tests.conftest import groups


@dataclass
class Streams:
    client: TlsStream
    server: TlsStream
    client_keys: KeyContext
    server_keys: KeyContext


@asynccontextmanager
async def stream_pair() -> AsyncIterator[Streams]:
    """A client and a server TlsStream over loopback that negotiated EKU on a QKD group
    (the endpoints of :func:`loopback_pair`; the server stream is the test's, not echoed)."""
    hybrids = groups("qkd_mlkem768")
    async with loopback_pair(hybrids) as pair:
        client = pair.client(hybrids, QkdOptions())
        async with _accepting(pair.server) as (port, accepted):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            async with asyncio.timeout(20):
                ours = await client.connect(reader, writer)
                theirs = await accepted.get()
            try:
                assert ours.fresh_key_updates and theirs.fresh_key_updates
                yield Streams(ours, theirs, pair.client_keys, pair.server_keys)
            finally:
                await ours.close()
                await theirs.close()


@asynccontextmanager
async def _accepting(
    server: TlsEndpoint,
) -> AsyncIterator[tuple[int, asyncio.Queue[TlsStream]]]:
    accepted: asyncio.Queue[TlsStream] = asyncio.Queue()
    handlers: list[asyncio.Task[None]] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.append(task)
        await accepted.put(await server.accept(reader, writer))

    listener = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield listener.sockets[0].getsockname()[1], accepted
    finally:
        listener.close()
        await asyncio.gather(*handlers, return_exceptions=True)
        await listener.wait_closed()


def state(stream: TlsStream) -> State:
    eku = stream._layer.eku
    assert eku is not None
    return eku.state


async def test_a_connection_reset_mid_update_settles_its_key_as_failed() -> None:
    """A broken pump resets the TLS side (``gate.reset``: no close_notify). The update the
    connection was running must not leave its QKD key outstanding in the ledger for ever,
    and it failed (the connection broke), it was not abandoned."""
    async with stream_pair() as s:
        assert await s.client.fresh_key_update()  # request sent; the server never reads it
        assert state(s.client) is State.AWAIT_RESPONSE
        assert s.client_keys.ledger.outstanding == 1
        gate.reset(s.client._driver.writer)
        s.client.abort("reset by the pump")
        assert s.client_keys.ledger.outstanding == 0
        stats = s.client.fresh_key_stats()
        assert (stats.failed, stats.abandoned) == (1, 0)
        with pytest.raises(TlsStreamError):
            await s.client.read()


async def test_a_transport_error_mid_update_counts_as_failed_not_abandoned() -> None:
    """The peer's socket resets while our update waits: the later close of the stream must
    not turn that into a clean "abandoned" update (nor send close_notify as if all was well)."""
    async with stream_pair() as s:
        assert await s.client.fresh_key_update()
        gate.reset(s.server._driver.writer)  # the peer's end is cut: RST to us
        with pytest.raises(TlsStreamError):
            await write_until_broken(s.client)
        await s.client.close()
        stats = s.client.fresh_key_stats()
        assert (stats.failed, stats.abandoned) == (1, 0)
        assert s.client_keys.ledger.outstanding == 0


async def write_until_broken(stream: TlsStream) -> None:
    async with asyncio.timeout(10):
        while True:
            await stream.write(b"x" * 65536)


class Clock:
    """A hand-driven stand-in for the ``time`` module of the stream driver."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def perf_counter(self) -> float:
        return self.now


async def test_the_deadline_spares_an_update_stuck_behind_our_own_full_send_buffer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A healthy but slow consumer: the peer's application does not read for a while (TCP
    flow control), so our key_update_request sits behind megabytes of data we queued. The
    peer cannot answer what it has not read: that must not fail the connection."""
    async with stream_pair() as s:
        clock = Clock()
        monkeypatch.setattr(tls_stream, "time", clock)
        writer = s.client._driver.writer
        flood = asyncio.create_task(s.client.write(b"\0" * (32 << 20)))  # more than loopback holds
        await asyncio.sleep(0)
        try:
            assert writer.transport.get_write_buffer_size() > 0  # the pipe is full
            assert await s.client.fresh_key_update()  # the request queues behind the flood
            clock.now += 60  # far past the deadline (10 s): the peer still reads nothing
            await s.client.check_fresh_key_deadline()  # held: our writes wait for the peer
            assert s.client.failure is None
        finally:
            flood.cancel()
            await asyncio.gather(flood, return_exceptions=True)
            for stream in (s.client, s.server):  # megabytes nobody will read
                stream._driver.writer.transport.abort()


async def test_a_deadline_past_a_stuck_peer_still_fails_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The other side of the coin: nothing of ours waits in the send buffer and the peer
    keeps the request unanswered, so the deadline fails the connection closed."""
    async with stream_pair() as s:
        clock = Clock()
        monkeypatch.setattr(tls_stream, "time", clock)
        assert await s.client.fresh_key_update()
        # Our side reads (as the tunnel pump always does): only the peer holds it up.
        reading = asyncio.create_task(s.client.read())
        await asyncio.sleep(0)
        clock.now += 11
        with pytest.raises(TlsStreamError) as caught:
            await s.client.check_fresh_key_deadline()
        with pytest.raises(TlsStreamError):
            await reading
        assert caught.value.alert == Alert.HANDSHAKE_FAILURE
        assert s.client.fresh_key_stats().failed == 1
        assert s.client_keys.ledger.outstanding == 0
        # The data tasks see why (it becomes the connection line's reason), not a
        # consequence such as "cannot send data: the connection is failed".
        with pytest.raises(TlsStreamError, match="not finished within"):
            await s.client.write(b"after")
        with pytest.raises(TlsStreamError, match="not finished within"):
            await s.client.read()
