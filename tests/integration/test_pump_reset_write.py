"""A write of tunnel data to a plaintext side its application (or backend) already reset
ends as a reset (ConnectionResetError), on asyncio's loop and on uvloop, not as uvloop's
RuntimeError for a write to a closed transport, which the connection line would show as a
fault of ours (seen once in the system test of a resetting backend)."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Awaitable, Callable

import pytest
import uvloop

from qkdproxy.daemon import pump

LOOPS = ("asyncio", "uvloop")


def run(loop: str, scenario: Callable[[], Awaitable[None]]) -> None:
    if loop == "uvloop":
        uvloop.run(scenario())  # type: ignore[arg-type]
    else:
        asyncio.run(scenario())  # type: ignore[arg-type]


async def write_after_reset() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    app = socket.create_connection(listener.getsockname())
    ours, _ = listener.accept()
    listener.close()
    reader, writer = await asyncio.open_connection(sock=ours)
    app.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    app.close()  # RST
    with pytest.raises(ConnectionResetError):
        await reader.read()  # the loop has read the reset: the transport is closed
    with pytest.raises(ConnectionResetError):
        await pump._write_plaintext(writer, [b"answer"])
    writer.close()


@pytest.mark.parametrize("loop", LOOPS)
def test_tunnel_data_for_a_reset_plaintext_side_ends_as_a_reset(loop: str) -> None:
    run(loop, write_after_reset)
