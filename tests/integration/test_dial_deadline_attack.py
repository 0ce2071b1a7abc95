"""The dial deadlines (aio.Deadline on the tunnel's loop) against a peer or backend that
never answers, over real sockets: a listener whose accept queue is full drops every new
SYN, so a dial there hangs until its deadline. The connection ends with why, the
application's socket is closed, the tunnel serves the next connection."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.integration.test_tunnel_runtime import port, setup

# Only a bound for a hang: never reached when the deadline fires.
HANG = 30.0


@contextmanager
def black_hole() -> Iterator[int]:
    """A port that takes no connection: its one-place accept queue is full."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    queued = socket.create_connection(listener.getsockname())
    try:
        yield listener.getsockname()[1]
    finally:
        queued.close()
        listener.close()


async def ended(client_port: int) -> bytes:
    """What the application gets, having sent a request, until its connection ends."""
    reader, writer = await asyncio.open_connection("127.0.0.1", client_port)
    try:
        writer.write(b"request")
        await writer.drain()
        try:
            return await asyncio.wait_for(reader.read(), HANG)
        except ConnectionError:
            return b"reset"
    finally:
        writer.close()


async def test_a_peer_that_never_answers_the_dial_is_given_up_at_the_deadline(
    tmp_path: Path,
) -> None:
    with black_hole() as silent:
        async with (
            setup(tmp_path) as s,
            s.daemon("client", s.client_toml(silent, "connect_timeout_s = 0.2")) as client,
        ):
            for _ in range(2):  # the tunnel still serves the next one
                assert await ended(port(client)) in (b"", b"reset")
                await asyncio.wait_for(client.tunnels[0].wait_idle(), HANG)
    reasons = [r.reason for r in s.records if r.role == "client"]
    assert reasons == ["peer unreachable: TimeoutError"] * 2


async def test_a_backend_that_never_answers_the_dial_is_given_up_at_the_deadline(
    tmp_path: Path,
) -> None:
    with black_hole() as silent:
        async with setup(tmp_path) as s:
            text = s.server_toml("connect_timeout_s = 0.2").replace(
                f'connect = "127.0.0.1:{s.backend_port}"', f'connect = "127.0.0.1:{silent}"'
            )
            async with (
                s.daemon("server", text) as server,
                s.daemon("client", s.client_toml(port(server))) as client,
            ):
                for _ in range(2):
                    assert await ended(port(client)) in (b"", b"reset")
                    await asyncio.wait_for(server.tunnels[0].wait_idle(), HANG)
    reasons = [r.reason for r in s.records if r.role == "server"]
    assert reasons == ["backend unreachable: TimeoutError"] * 2
