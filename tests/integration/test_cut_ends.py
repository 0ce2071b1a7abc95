"""A cut is never presented as a clean end, between real daemons (real sockets, real KME
simulator), in both modes (per-connection tunnels and multiplexed streams) and both
directions: whenever a connection or stream ends before both sides finished, an end that
received bytes whose sender had not finished sees a reset, never EOF.

The ends here are deliberate ones (the idle timeout, on either daemon) taken while one
direction is still open: the backend has answered in part and not finished, or the
application has uploaded in part and not finished. FIN is right only for a direction
whose sender ended it and whose bytes were all delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import NamedTuple

import pytest

from qkdproxy.daemon.app import Daemon
from tests.integration.test_mux_goaway import MUX, CountingBackend
from tests.integration.test_tunnel_runtime import Setup, port, setup
from tests.system_helpers import eventually

ANSWER = b"the first part of an answer that never finished"
UPLOAD = b"the first part of an upload that never finished"
IDLE = "idle_timeout_s = 1"


class Holding(CountingBackend):
    """Reads to the end of what the application sends, answering ``answer`` (if any) at
    once and never ending its own direction until :meth:`let_go`; records whether the
    application's direction ended with EOF or a reset."""

    def __init__(self, answer: bytes = b"") -> None:
        super().__init__()
        self.answer = answer
        self.ends: list[str] = []
        self._let_go = asyncio.Event()

    def let_go(self) -> None:
        self._let_go.set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got = bytearray()
        self.received.append(got)
        try:
            if self.answer:
                writer.write(self.answer)
                await writer.drain()
            while data := await reader.read(65536):
                got += data
            self.ends.append("eof")
        except ConnectionError:
            self.ends.append("reset")
        try:
            await self._let_go.wait()
        finally:
            writer.close()


async def upload_and_read(client_port: int, backend: Holding) -> tuple[bytes, str]:
    """An application that sends UPLOAD without ending it and reads to the end (what it
    read, how it ended); returns once the backend read to the end of the upload too."""
    reader, writer = await asyncio.open_connection("127.0.0.1", client_port)
    writer.write(UPLOAD)
    await writer.drain()
    return await both_ends(reader, writer, backend)


async def both_ends(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, backend: Holding
) -> tuple[bytes, str]:
    """Read the application's connection to its end (what it read, how it ended), then
    wait for the backend's end and let its connection go."""
    got, end = await read_to_the_end(reader)
    writer.close()

    async def backend_done() -> bool:
        return bool(backend.ends)

    await eventually(backend_done, "the backend read to the end of the upload")
    backend.let_go()
    return got, end


async def read_to_the_end(reader: asyncio.StreamReader) -> tuple[bytes, str]:
    """What the application read, and how its connection ended ("eof" or "reset")."""
    got = bytearray()
    try:
        while data := await asyncio.wait_for(reader.read(65536), 15):
            got += data
    except ConnectionError:
        return bytes(got), "reset"
    return bytes(got), "eof"


class HalfDone(NamedTuple):
    setup: Setup
    server: Daemon
    client: Daemon
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


@contextlib.asynccontextmanager
async def half_done(tmp_path: Path, backend: Holding, mode: str) -> AsyncIterator[HalfDone]:
    """Both daemons (``mode``: "multiplexed" or "per-connection") and one application
    connection half done: UPLOAD sent and not ended, the backend's ANSWER read."""
    mux = MUX if mode == "multiplexed" else ""
    async with (
        setup(tmp_path, backend) as s,
        s.daemon("server", s.server_toml(mux)) as server,
        s.daemon("client", s.client_toml(port(server), mux)) as client,
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", port(client))
        writer.write(UPLOAD)
        await writer.drain()
        assert await asyncio.wait_for(reader.readexactly(len(ANSWER)), 15) == ANSWER
        yield HalfDone(s, server, client, reader, writer)


@contextlib.asynccontextmanager
async def limited_pair(
    tmp_path: Path, backend: Holding, mode: str, idle_on: str, limit: str = IDLE
) -> AsyncIterator[tuple[Setup, int]]:
    """A daemon pair in ``mode`` with the idle timeout (or another ``limit``) on
    ``idle_on``; yields the setup and the client's listening port."""
    mux = MUX if mode == "multiplexed" else ""
    server_extra = f"{mux}\n{limit}" if idle_on == "server" else mux
    client_extra = f"{mux}\n{limit}" if idle_on == "client" else mux
    async with (
        setup(tmp_path, backend) as s,
        s.daemon("server", s.server_toml(server_extra)) as server,
        s.daemon("client", s.client_toml(port(server), client_extra)) as client,
    ):
        yield s, port(client)


@pytest.mark.parametrize("idle_on", ["client", "server"])
@pytest.mark.parametrize("mode", ["multiplexed", "per-connection"])
async def test_an_idle_timeout_after_part_of_an_answer_resets_the_application(
    tmp_path: Path, mode: str, idle_on: str
) -> None:
    """The application sends its request and half-closes; the backend answers a part and
    then neither finishes nor closes. The idle timeout (of either daemon) ends the
    connection: the application got part of an answer whose sender never ended it, so it
    must see a reset. It read that part and then EOF, as if the answer were complete."""
    backend = Holding(answer=ANSWER)
    async with limited_pair(tmp_path, backend, mode, idle_on) as (_, client_port):
        reader, writer = await asyncio.open_connection("127.0.0.1", client_port)
        writer.write(b"request")
        writer.write_eof()
        got, end = await read_to_the_end(reader)
        writer.close()
        backend.let_go()
    assert got == ANSWER
    assert end == "reset", "the application took a part of the answer for all of it"
    assert backend.ends == ["eof"]  # the application's direction was complete
    assert [bytes(r) for r in backend.received] == [b"request"]


@pytest.mark.parametrize("idle_on", ["client", "server"])
@pytest.mark.parametrize("mode", ["multiplexed", "per-connection"])
async def test_an_idle_timeout_after_part_of_an_upload_resets_the_backend(
    tmp_path: Path, mode: str, idle_on: str
) -> None:
    """The application sends part of an upload and then neither finishes nor closes; the
    backend reads it. The idle timeout (of either daemon) ends the connection: the backend
    got part of an upload whose sender never ended it, so it must see a reset, never EOF
    (which says "that was all")."""
    backend = Holding()
    async with limited_pair(tmp_path, backend, mode, idle_on) as (_, client_port):
        reader, writer = await asyncio.open_connection("127.0.0.1", client_port)
        writer.write(UPLOAD)
        await writer.drain()

        async def backend_done() -> bool:
            return bool(backend.ends)

        await eventually(backend_done, "the backend read to the end of the upload")
        got, end = await read_to_the_end(reader)
        writer.close()
        backend.let_go()
    assert [bytes(r) for r in backend.received] == [UPLOAD]
    assert backend.ends == ["reset"], "the backend took a part of the upload for all of it"
    assert (got, end) == (b"", "reset")


class FinInjector:
    """An on-path attacker between the daemons: relays both ways and, once ``after`` bytes
    went from the server to the client, ends both directions with a TCP FIN (no TLS
    close_notify can be forged) and stops relaying."""

    def __init__(self, target: int, after: int) -> None:
        self.target = target
        self.after = after
        self.injected = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)

        async def upstream() -> None:
            while not self.injected.is_set() and (data := await reader.read(65536)):
                up_writer.write(data)
                await up_writer.drain()

        async def downstream() -> None:
            moved = 0
            while moved < self.after and (data := await up_reader.read(self.after - moved)):
                writer.write(data)
                await writer.drain()
                moved += len(data)
            self.injected.set()
            writer.write_eof()
            up_writer.write_eof()

        with contextlib.suppress(ConnectionError, OSError):
            await asyncio.gather(upstream(), downstream())
        await self.injected.wait()
        writer.close()
        up_writer.close()


@pytest.mark.parametrize("mode", ["multiplexed", "per-connection"])
async def test_a_tcp_fin_injected_between_the_daemons_mid_answer_resets_both_ends(
    tmp_path: Path, mode: str
) -> None:
    """Held (coverage the suite lacked for multiplexed tunnels between real daemons): an
    on-path attacker ends the path between the daemons with TCP FINs in the middle of a
    2 MB answer, while the application's upload is still open. The application reads a
    part of the answer and then a reset; the backend reads the part of the upload that
    came and then a reset: neither can take the cut for a clean end."""
    answer = bytes(range(256)) * 8192
    backend = Holding(answer=answer)
    mux = MUX if mode == "multiplexed" else ""
    async with setup(tmp_path, backend) as s, s.daemon("server", s.server_toml(mux)) as server:
        relay = FinInjector(port(server), after=300_000)
        listener = await asyncio.start_server(relay.handle, "127.0.0.1", 0)
        relay_port = listener.sockets[0].getsockname()[1]
        async with s.daemon("client", s.client_toml(relay_port, mux)) as client:
            got, end = await upload_and_read(port(client), backend)
        listener.close()
    assert relay.injected.is_set()
    assert len(got) < len(answer) and answer.startswith(got)
    assert end == "reset", "the application took a part of the answer for all of it"
    assert backend.ends == ["reset"], "the backend took a part of the upload for all of it"


@pytest.mark.parametrize("mode", ["multiplexed", "per-connection"])
async def test_bytes_dropped_by_a_reset_are_not_counted_as_passed_on(
    tmp_path: Path, mode: str
) -> None:
    """The application reads nothing (a small receive buffer) while the backend sends 3 MB
    and then stalls; the client's idle timeout resets the application. Whatever the
    client daemon still held for it (its own write buffer, its socket's unsent queue) is
    dropped by the reset and never reaches it: the line's bytes_from_peer must not count
    it. The application then reads all that did reach it (the kernel keeps it readable
    until the reset is read)."""
    backend = Holding(answer=os.urandom(3_000_000))
    async with limited_pair(tmp_path, backend, mode, "client") as (s, client_port):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        sock.connect(("127.0.0.1", client_port))
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(b"request")
        writer.write_eof()

        async def client_line() -> bool:
            return any(r.role == "client" and r.bytes_from_peer for r in s.records)

        await eventually(client_line, "the client's line for the application")
        got, end = await read_to_the_end(reader)
        writer.close()
        backend.let_go()
    [line] = [r for r in s.records if r.role == "client" and r.bytes_from_peer]
    assert end == "reset"
    assert line.bytes_from_peer <= len(got), f"{line.bytes_from_peer - len(got)} bytes claimed"


@pytest.mark.parametrize("draining", ["client", "server"])
@pytest.mark.parametrize("mode", ["multiplexed", "per-connection"])
async def test_the_drain_deadline_resets_both_ends_of_an_unfinished_connection(
    tmp_path: Path, mode: str, draining: str
) -> None:
    """Held (the suite had no test of the drain deadline cutting a live connection between
    daemons): one daemon stops as on SIGTERM, and its drain deadline passes while a
    connection is half done (part of an answer read, the upload still open). The
    application reads the part and then a reset; the backend reads the part of the upload
    and then a reset."""
    backend = Holding(answer=ANSWER)
    async with half_done(tmp_path, backend, mode) as (_, server, client, reader, writer):

        async def upload_arrived() -> bool:
            return bytes(backend.received[0]) == UPLOAD if backend.received else False

        await eventually(upload_arrived, "the upload at the backend")
        tunnel = (client if draining == "client" else server).tunnels[0]
        tunnel.stop_accepting()
        await tunnel.drain(0.1)
        got, end = await both_ends(reader, writer, backend)
    assert (got, end) == (b"", "reset")
    assert backend.ends == ["reset"]


@pytest.mark.parametrize("limit_on", ["client", "server"])
@pytest.mark.parametrize("mode", ["multiplexed", "per-connection"])
async def test_the_maximum_lifetime_resets_both_ends_of_an_unfinished_connection(
    tmp_path: Path, mode: str, limit_on: str
) -> None:
    """Held (the suite tested a per-connection client's lifetime only): max_lifetime_s on
    either daemon ends a connection whose answer and upload are both unfinished (on a
    server with multiplexing, the whole tunnel's lifetime). The application reads the
    part of the answer and then a reset; the backend the part of the upload, then a
    reset."""
    backend = Holding(answer=ANSWER)
    lifetime = "max_lifetime_s = 1"
    async with limited_pair(tmp_path, backend, mode, limit_on, lifetime) as (_, client_port):
        got, end = await upload_and_read(client_port, backend)
    assert (got, end) == (ANSWER, "reset")
    assert [bytes(r) for r in backend.received] == [UPLOAD]
    assert backend.ends == ["reset"]
