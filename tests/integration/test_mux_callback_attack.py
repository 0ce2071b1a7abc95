"""Streams on callbacks between real daemons (real sockets, real KME simulator), attacked
from the application side and from a stuck tunnel transport: many streams of checksummed
bytes, silent, half-closing, slow-reading and resetting applications, a tunnel whose
transport stops being read until the client's writes back up, and then flows again.

Every byte must come back once and in order, every stream must end (no stall once the
transport drained), no callback may raise into the event loop, and the client's file
descriptors must return to where they were.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import random
import socket
import struct
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path

import pytest

from qkdproxy.core import mux
from qkdproxy.daemon.app import Daemon
from qkdproxy.daemon.muxconn import MuxTunnel
from tests.integration.test_mux_goaway import MUX, CountingBackend, client_streams
from tests.integration.test_tunnel_runtime import Setup, port, setup, transfer
from tests.system_helpers import eventually

STREAMS = 64
# Key updates every 100 KB each way, and the pool's tunnel rotated after 3 MB: the
# writer task renews keys (streams stop meanwhile) and streams move to a new tunnel.
CHURN = "rekey_bytes = 100000\nmux_rotate_bytes = 3000000"


def on_uvloop(work: Coroutine[object, object, None]) -> None:
    """Run ``work`` on uvloop, which the daemons run on when it is installed."""
    uvloop = pytest.importorskip("uvloop")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(work)


class HeldRelay:
    """A TCP relay between the client daemon and the server daemon whose client-to-server
    direction can be stopped (:meth:`hold`): the client's tunnel transport then backs up
    once the kernel's buffers are full (its listening socket has a small receive buffer)."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.server: asyncio.Server | None = None
        # Ended by close(), which aborts their sockets and waits for them: a connection
        # task left pending when the test's loop ends is destroyed with its sockets open
        # (ResourceWarnings), and a cancelled one makes asyncio's server log an error.
        self.connections: dict[asyncio.Task[None], list[asyncio.StreamWriter]] = {}

    async def start(self) -> int:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.bind(("127.0.0.1", 0))
        self.server = await asyncio.start_server(self.handle, sock=sock)
        return int(sock.getsockname()[1])

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        self.flowing.set()
        for writers in self.connections.values():
            for writer in writers:
                writer.transport.abort()
        await asyncio.gather(*self.connections, return_exceptions=True)
        await self.server.wait_closed()

    def hold(self) -> None:
        self.flowing.clear()

    def release(self) -> None:
        self.flowing.set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        writers = self.connections[task] = [writer]
        try:
            await self.relay(reader, writer, writers)
        finally:
            writer.close()
            del self.connections[task]

    async def relay(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        writers: list[asyncio.StreamWriter],
    ) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        writers.append(up_writer)

        async def pipe(
            source: asyncio.StreamReader, sink: asyncio.StreamWriter, held: bool
        ) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while True:
                    if held:
                        await self.flowing.wait()
                    data = await source.read(16384)
                    if not data:
                        break
                    sink.write(data)
                    await sink.drain()
                sink.write_eof()

        try:
            await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))
        finally:
            up_writer.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def callback_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What the event loop logged of callbacks and tasks that raised."""
    return [
        r.getMessage() for r in caplog.records if r.name == "asyncio" and r.levelno >= logging.ERROR
    ]


def the_tunnel(client: Daemon) -> MuxTunnel:
    pool = client.tunnels[0].pool
    assert pool is not None
    [tunnel] = pool.tunnels
    return tunnel


async def checked(client_port: int, payload: bytes, how: str) -> bytes:
    """One application connection: sends ``payload`` in pieces, half-closes, reads the
    echo (in small reads if ``how`` is "slow"); "silent" sends nothing and half-closes at
    once; the digest of what came back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", client_port)
    received = hashlib.sha256()

    async def read_all() -> None:
        size = 997 if how == "slow" else 65536
        while data := await reader.read(size):
            received.update(data)

    reading = asyncio.ensure_future(read_all())
    try:
        for at in range(0, len(payload), 50_000):
            writer.write(payload[at : at + 50_000])
            await writer.drain()
        writer.write_eof()
        await asyncio.wait_for(reading, 30)
    finally:
        reading.cancel()
        writer.close()
    return received.digest()


@pytest.mark.parametrize("churn", [False, True])
async def test_64_streams_through_a_tunnel_stuck_until_it_backed_up_then_freed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, churn: bool
) -> None:
    await stuck_then_freed(tmp_path, caplog, churn)


@pytest.mark.parametrize("churn", [False, True])
def test_64_streams_through_a_stuck_tunnel_on_uvloop(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, churn: bool
) -> None:
    on_uvloop(stuck_then_freed(tmp_path, caplog, churn))


async def stuck_then_freed(tmp_path: Path, caplog: pytest.LogCaptureFixture, churn: bool) -> None:
    """64 applications at once (silent ones, slow readers, uploads up to 600 KB) while the
    tunnel's transport is not read until the client's writes backed up past the
    high-water mark; then it flows. Catches: a stream that does not resume after the
    drain (the gather times out), lost, duplicated or reordered bytes (the digests), an
    END_STREAM before the last byte (short echo), a raising callback, a leaked socket.
    With ``churn``, key updates and a tunnel rotation happen mid-run."""
    caplog.set_level(logging.ERROR, logger="asyncio")
    rng = random.Random(18)
    backend = CountingBackend()
    async with setup(tmp_path, backend) as s:
        # Once a listener is up (uvloop reserves a descriptor for the loop then).
        baseline = open_fds()
        await stuck_run(s, rng, churn)

        async def fds_back() -> bool:
            return open_fds() <= baseline

        await eventually(fds_back, f"file descriptors back to {baseline}")
    streams = client_streams(s.records)
    assert len(streams) == STREAMS + 1
    assert all(r.reason == "closed" for r in streams), {r.reason for r in streams}
    assert callback_errors(caplog) == []


async def stuck_run(s: Setup, rng: random.Random, churn: bool) -> None:
    backend = s.backend
    assert isinstance(backend, CountingBackend)
    async with s.daemon("server", s.server_toml(MUX)) as server:
        relay = HeldRelay(port(server))
        relay_port = await relay.start()
        text = s.client_toml(relay_port, f"{MUX}\n{CHURN}" if churn else MUX)
        async with s.daemon("client", text) as client:
            assert await transfer(port(client), b"warm") == b"warm"
            tunnel = the_tunnel(client)
            relay.hold()
            kinds = ["silent", "slow"] + ["bulk"] * (STREAMS - 2)
            payloads = [
                b"" if kind == "silent" else rng.randbytes(rng.randint(1, 600_000))
                for kind in kinds
            ]
            apps = [
                asyncio.ensure_future(checked(port(client), p, k))
                for p, k in zip(payloads, kinds, strict=True)
            ]

            async def backed_up() -> bool:
                return tunnel.backed_up

            await eventually(backed_up, "the client's tunnel transport backed up")
            relay.release()
            digests = await asyncio.wait_for(asyncio.gather(*apps), 60)
            assert digests == [hashlib.sha256(p).digest() for p in payloads]
            assert not tunnel.backed_up
            if churn:
                assert tunnel.key_updates > 0
            else:
                assert tunnel.alive and the_tunnel(client) is tunnel  # one was enough
        await relay.close()
    assert sorted(bytes(r) for r in backend.received) == sorted([b"warm", *payloads])


async def reset_mid_upload(client_port: int, sent: int) -> None:
    """An application that sends ``sent`` bytes and resets (RST, SO_LINGER 0)."""
    _, writer = await asyncio.open_connection("127.0.0.1", client_port)
    writer.write(os.urandom(sent))
    await writer.drain()
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()


async def test_applications_resetting_mid_upload_through_a_stuck_tunnel(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    await resetting_mid_upload(tmp_path, caplog)


def test_applications_resetting_mid_upload_on_uvloop(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    on_uvloop(resetting_mid_upload(tmp_path, caplog))


async def resetting_mid_upload(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Applications that reset mid-upload while their bytes wait in the client (the tunnel
    is not read): each of their streams ends with an error and is reset, the others'
    bytes all arrive once the tunnel flows, and nothing raises into the event loop."""
    caplog.set_level(logging.ERROR, logger="asyncio")
    rng = random.Random(5)
    backend = CountingBackend()
    async with setup(tmp_path, backend) as s, s.daemon("server", s.server_toml(MUX)) as server:
        relay = HeldRelay(port(server))
        relay_port = await relay.start()
        async with s.daemon("client", s.client_toml(relay_port, MUX)) as client:
            assert await transfer(port(client), b"warm") == b"warm"
            tunnel = the_tunnel(client)
            relay.hold()
            payloads = [rng.randbytes(400_000) for _ in range(12)]
            apps = [asyncio.ensure_future(checked(port(client), p, "bulk")) for p in payloads]

            async def backed_up() -> bool:
                return tunnel.backed_up

            await eventually(backed_up, "the client's tunnel transport backed up")
            await asyncio.gather(*(reset_mid_upload(port(client), 300_000) for _ in range(8)))

            async def all_seen() -> bool:
                return len(client.tunnels[0]._connections) == 20

            await eventually(all_seen, "every application's connection accepted")
            relay.release()
            digests = await asyncio.wait_for(asyncio.gather(*apps), 60)
            assert digests == [hashlib.sha256(p).digest() for p in payloads]

            async def all_ended() -> bool:
                return not client.tunnels[0]._connections

            await eventually(all_ended, "every connection ended")
            assert tunnel.alive and not tunnel.streams
        await relay.close()
    reasons = sorted(r.reason for r in client_streams(s.records))
    assert reasons.count("closed") == 13, reasons
    assert all(r.startswith("error: Connection") for r in reasons if r != "closed"), reasons
    assert callback_errors(caplog) == []


@pytest.mark.parametrize("window", [1024, 5000])
async def test_tiny_windows_between_real_daemons_move_every_byte(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    window: int,
) -> None:
    """Both daemons announce (and return) stream windows of a few KB instead of 1 MiB, and
    a tunnel window of that times the stream limit: every stream is woken by hundreds of
    small WINDOW_UPDATEs, its bytes waiting in its reader in between. Catches a stream that
    misses one wake-up and stalls (the wait times out), a re-pull that spins (it never
    yields: the wait times out), lost or reordered bytes (the digests)."""
    monkeypatch.setattr(mux, "STREAM_WINDOW", window)
    caplog.set_level(logging.ERROR, logger="asyncio")
    rng = random.Random(window)
    async with (
        setup(tmp_path, CountingBackend()) as s,
        s.daemon("server", s.server_toml(MUX)) as server,
        s.daemon("client", s.client_toml(port(server), MUX)) as client,
    ):
        payloads = [rng.randbytes(rng.randint(0, 120_000)) for _ in range(24)]
        kinds = ["slow" if i % 3 == 0 else "bulk" for i in range(len(payloads))]
        digests = await asyncio.wait_for(
            asyncio.gather(
                *(checked(port(client), p, k) for p, k in zip(payloads, kinds, strict=True))
            ),
            60,
        )
        assert digests == [hashlib.sha256(p).digest() for p in payloads]
        assert the_tunnel(client).conn._peer_initial_window == window  # the patch took
    reasons = {r.reason for r in client_streams(s.records)}
    assert reasons == {"closed"}
    assert callback_errors(caplog) == []


async def test_bulk_both_ways_on_64_streams_never_deadlocks_the_tunnel(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """FAILS on fa0eed6 (and on its parent): 64 streams each sending 1 MB to an echoing
    backend, while reading the echo. Both daemons' transports back up at once; each tunnel's
    reader task then waits in ``flush()`` for its own transport to drain after every read,
    so neither side reads the other any more, and neither transport ever drains: every
    stream hangs (with keepalives the tunnel is broken as a dead peer instead, every
    stream reset). The reader must hand what a read produced (WINDOW_UPDATEs, acks) to TLS
    without waiting for its own transport."""
    await bulk_both_ways(tmp_path, caplog)


def test_bulk_both_ways_never_deadlocks_on_uvloop(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """As above, on uvloop (FAILS on fa0eed6)."""
    on_uvloop(bulk_both_ways(tmp_path, caplog))


async def bulk_both_ways(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="asyncio")
    rng = random.Random(64)
    async with (
        setup(tmp_path, CountingBackend()) as s,
        s.daemon("server", s.server_toml(MUX)) as server,
        s.daemon("client", s.client_toml(port(server), MUX)) as client,
    ):
        payloads = [rng.randbytes(1_000_000) for _ in range(STREAMS)]
        apps = asyncio.gather(
            *(checked(port(client), p, "bulk") for p in payloads), return_exceptions=True
        )
        # Done in well under a second when it works; a deadlock never ends.
        await asyncio.wait({apps}, timeout=20)
        if not apps.done():
            tunnel = the_tunnel(client)
            stuck = f"deadlocked: both tunnels backed up (client: {tunnel.backed_up})"
            for each in (tunnel, *server.tunnels[0]._mux_tunnels):
                each._break(stuck)  # so that the applications and daemons end at once
            await apps
            pytest.fail(stuck)
        digests = apps.result()
        assert digests == [hashlib.sha256(p).digest() for p in payloads]
    assert {r.reason for r in client_streams(s.records)} == {"closed"}
    assert callback_errors(caplog) == []


@contextlib.asynccontextmanager
async def backed_up_behind_a_held_relay(
    tmp_path: Path, extra: str, backend: CountingBackend | None = None
) -> AsyncIterator[tuple[MuxTunnel, int]]:
    """A multiplexing daemon pair (client settings ``extra``) whose path stops carrying the
    client's bytes once a first connection worked; yields the client's tunnel and listening
    port once four 4 MB uploads backed its transport up (they end with the block, and the
    path flows again)."""
    async with (
        setup(tmp_path, backend or CountingBackend()) as s,
        s.daemon("server", s.server_toml(MUX)) as server,
    ):
        relay = HeldRelay(port(server))
        relay_port = await relay.start()
        text = s.client_toml(relay_port, f"multiplex = true\n{extra}")
        async with s.daemon("client", text) as client:
            assert await transfer(port(client), b"warm") == b"warm"
            tunnel = the_tunnel(client)
            relay.hold()
            bulk = asyncio.gather(
                *(checked(port(client), os.urandom(4_000_000), "bulk") for _ in range(4)),
                return_exceptions=True,
            )

            async def backed_up() -> bool:
                return tunnel.backed_up

            await eventually(backed_up, "the client's tunnel transport backed up")
            try:
                yield tunnel, port(client)
            finally:
                await bulk
                relay.release()
        await relay.close()


async def test_a_black_holed_tunnel_is_found_dead_while_its_transport_is_backed_up(
    tmp_path: Path,
) -> None:
    """FAILS on fa0eed6 (and its parent): the path to the server stops carrying anything
    (the relay reads nothing more) while the client uploads, so the client's transport
    backs up. The keepalive must still find the dead peer within about mux_keepalive_s;
    instead its PING's flush waits for the transport's drain, which never comes, and it
    never looks at the silence again: the tunnel and every stream hang."""
    async with backed_up_behind_a_held_relay(tmp_path, "mux_keepalive_s = 1") as (tunnel, _):
        ended = asyncio.ensure_future(tunnel.ended.wait())
        await asyncio.wait({ended}, timeout=10)  # a deadline: found in about 1 s
        ended.cancel()
        found = tunnel.reason
        if found is None:
            tunnel._break("test: never found dead")  # so that everything ends now
    assert found is not None and found.startswith("dead peer"), found


async def test_an_upload_that_never_left_a_broken_tunnel_is_reset_not_closed(
    tmp_path: Path,
) -> None:
    """An application sends its request and half-closes while the tunnel's transport is
    backed up, so its bytes wait in the client daemon; then the tunnel is found dead. The
    upload never reached anyone: a clean end (FIN) would pass for "delivered, nothing to
    say" to an application that uploads and waits for the close, so it must be reset, as
    a per-connection tunnel resets an application whose bytes it took."""
    backend = CountingBackend()
    extra = "mux_keepalive_s = 2\nmux_pool_max = 1"
    async with backed_up_behind_a_held_relay(tmp_path, extra, backend) as (tunnel, client_port):
        reader, writer = await asyncio.open_connection("127.0.0.1", client_port)
        writer.write(b"an upload that must not be taken for delivered")
        writer.write_eof()
        try:
            got: bytes | Exception = await asyncio.wait_for(reader.read(), 15)
        except ConnectionError as exc:
            got = exc
        writer.close()
    assert tunnel.reason is not None and tunnel.reason.startswith("dead peer"), tunnel.reason
    assert isinstance(got, ConnectionResetError), got
    assert b"an upload" not in b"".join(bytes(r) for r in backend.received)


class LateReader(CountingBackend):
    """Reads nothing for ``pause`` seconds (the stream's window shuts and the client's
    upload waits), then reads to the end; records whether that end was a reset."""

    def __init__(self, pause: float) -> None:
        super().__init__()
        self.pause = pause
        self.ends: list[str] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got = bytearray()
        self.received.append(got)
        await asyncio.sleep(self.pause)
        try:
            while data := await reader.read(65536):
                got += data
            self.ends.append("eof")
        except ConnectionError:
            self.ends.append("reset")
        finally:
            writer.close()


@pytest.mark.parametrize("mode", ["multiplexed", "per-connection"])
async def test_an_idle_timeout_with_an_upload_still_waiting_resets_both_ends(
    tmp_path: Path, mode: str
) -> None:
    """The backend stops reading, so the stream's window shuts and the rest of an
    application's 64 MB upload (usually more than the windows and every socket buffer on
    the way hold) waits in the client daemon; the client's idle timeout ends the stream. Neither
    end may take the cut for a clean end: the backend reads what arrived and then a reset,
    never EOF, and the application gets a reset. A per-connection tunnel failed this
    (its close_notify after the 10 MB that had left: the backend read EOF). Multiplexed,
    the rule that a stream leaving bytes unsent is reset, not ended, is pinned by
    test_mux_pull's unit test: here the kernel's own RST for unread data and the CANCEL
    behind END_STREAM would mask its loss."""
    backend = LateReader(pause=3.0)
    mux = MUX if mode == "multiplexed" else ""
    async with (
        setup(tmp_path, backend) as s,
        s.daemon("server", s.server_toml(mux)) as server,
        s.daemon("client", s.client_toml(port(server), f"{mux}\nidle_timeout_s = 1")) as client,
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", port(client))
        upload = os.urandom(64_000_000)
        writer.write(upload)  # not drained: the daemon stops reading once its buffer is full
        try:
            got: bytes | Exception = await asyncio.wait_for(reader.read(), 15)
        except ConnectionError as exc:
            got = exc
        writer.transport.abort()

        async def backend_done() -> bool:
            return bool(backend.ends)

        await eventually(backend_done, "the backend read to the end of the stream")
    [received] = backend.received
    # Usually part of it (on Python 3.12 the whole upload can be in the backend's socket
    # by then): a reset, not EOF, either way; the application never ended its upload.
    assert received and upload.startswith(bytes(received))
    assert backend.ends == ["reset"], f"the backend took {len(received)} bytes for the whole"
    assert isinstance(got, ConnectionResetError), got
    lines = [r for r in s.records if r.role == "client" and r.bytes_to_peer]
    assert [r.reason for r in lines] == ["idle_timeout"]
