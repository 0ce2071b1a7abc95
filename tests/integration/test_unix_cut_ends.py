"""A cut on a unix plaintext side (client ``listen``, server ``connect``) reaches the
application or the backend as a clean end (EOF): a known limit, docs/RELIABILITY.md
"Known limits". A unix stream socket has no reset: SO_LINGER 0 does not apply to it, and
its close tells the peer ECONNRESET only if the closing side left unread bytes in its own
receive queue, which the pump never does. These tests state the behaviour the tunnel
wants (a reset, as on TCP: tests/integration/test_cut_ends.py) and fail until a way to
signal it exists.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.integration.test_cut_ends import ANSWER, IDLE, UPLOAD, Holding, read_to_the_end
from tests.integration.test_tunnel_runtime import port, setup
from tests.system_helpers import eventually

UNIX_HAS_NO_RESET = pytest.mark.xfail(
    strict=True, reason="a unix stream socket cannot be reset (docs/RELIABILITY.md)"
)


async def backend_ended(backend: Holding) -> None:
    async def done() -> bool:
        return bool(backend.ends)

    await eventually(done, "the backend read to the end of the upload")
    backend.let_go()


@UNIX_HAS_NO_RESET
async def test_a_cut_upload_reaches_a_unix_backend_as_a_reset(tmp_path: Path) -> None:
    """The client's idle timeout cuts an upload the application never ended; the server
    resets its backend, which is on a unix socket: the backend reads EOF, and would take
    the part it got for the whole upload."""
    backend = Holding(ANSWER)
    backend_path = str(tmp_path / "backend.sock")
    unix_backend = await asyncio.start_unix_server(backend.handle, backend_path)
    try:
        async with setup(tmp_path, backend) as s:
            server_text = s.server_toml().replace(
                f'connect = "127.0.0.1:{s.backend_port}"', f'connect = "unix:{backend_path}"'
            )
            async with (
                s.daemon("server", server_text) as server,
                s.daemon("client", s.client_toml(port(server), IDLE)) as client,
            ):
                reader, writer = await asyncio.open_connection("127.0.0.1", port(client))
                writer.write(UPLOAD)
                await writer.drain()
                _, end = await read_to_the_end(reader)
                writer.close()
                await backend_ended(backend)
    finally:
        unix_backend.close()
    assert end == "reset"  # the application's side is TCP
    assert bytes(backend.received[0]) == UPLOAD
    assert backend.ends == ["reset"]


@UNIX_HAS_NO_RESET
async def test_a_cut_answer_reaches_a_unix_application_as_a_reset(tmp_path: Path) -> None:
    """The client's idle timeout cuts an answer the backend never ended; the client resets
    the application's connection, which is on a unix socket: the application reads EOF
    after part of the answer."""
    backend = Holding(ANSWER)
    client_path = tmp_path / "client.sock"
    async with setup(tmp_path, backend) as s, s.daemon("server", s.server_toml()) as server:
        client_text = s.client_toml(port(server), IDLE).replace(
            'listen = "127.0.0.1:0"', f'listen = "unix:{client_path}"'
        )
        async with s.daemon("client", client_text):
            reader, writer = await asyncio.open_unix_connection(str(client_path))
            writer.write(UPLOAD)
            await writer.drain()
            got, end = await read_to_the_end(reader)
            writer.close()
            await backend_ended(backend)
    assert got == ANSWER
    assert end == "reset"
