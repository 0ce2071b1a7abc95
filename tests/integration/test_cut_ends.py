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
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

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


async def read_to_the_end(reader: asyncio.StreamReader) -> tuple[bytes, str]:
    """What the application read, and how its connection ended ("eof" or "reset")."""
    got = bytearray()
    try:
        while data := await asyncio.wait_for(reader.read(65536), 15):
            got += data
    except ConnectionError:
        return bytes(got), "reset"
    return bytes(got), "eof"


@contextlib.asynccontextmanager
async def idle_pair(
    tmp_path: Path, backend: Holding, mode: str, idle_on: str
) -> AsyncIterator[tuple[Setup, int]]:
    """A daemon pair in ``mode`` with the idle timeout on ``idle_on``; yields the setup and
    the client's listening port."""
    mux = MUX if mode == "multiplexed" else ""
    server_extra = f"{mux}\n{IDLE}" if idle_on == "server" else mux
    client_extra = f"{mux}\n{IDLE}" if idle_on == "client" else mux
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
    async with idle_pair(tmp_path, backend, mode, idle_on) as (_, client_port):
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
    async with idle_pair(tmp_path, backend, mode, idle_on) as (_, client_port):
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
