"""Data from the tunnel for a plaintext side its application (or backend) already reset:
the connection ends as a reset (ConnectionResetError), on asyncio's loop and on uvloop,
not as uvloop's RuntimeError for a write to a closed transport, which the line would show
as a fault of ours (seen once in the system test of a resetting backend)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Awaitable, Callable

import pytest
import uvloop

from qkdproxy.daemon.pump import Traffic, pump

LOOPS = ("asyncio", "uvloop")
HANG = 30.0


def run(loop: str, scenario: Callable[[], Awaitable[str]]) -> str:
    if loop == "uvloop":
        return uvloop.run(scenario(), debug=False)  # type: ignore[arg-type]
    return asyncio.run(scenario())  # type: ignore[arg-type]


class LateChannel:
    """The tunnel side: delivers ``data`` once ``release`` is set, then ends."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self._delivered = False

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        pass

    async def send_fin(self) -> None:
        pass

    async def receive(self) -> bytes:
        return b""

    async def receive_parts(self) -> list[bytes]:
        await self.release.wait()
        if self._delivered:
            await asyncio.Event().wait()  # the pump ends on the first direction's error
        self._delivered = True
        return [b"answer"]

    async def update_keys(self) -> None:
        pass

    async def close(self) -> None:
        pass


async def reset_then_data() -> str:
    """The pump's plaintext reader never ends (so only the write can fail); the socket's
    own reader shows when the reset arrived, and only then does the tunnel deliver."""
    listener = socket.create_server(("127.0.0.1", 0))
    app = socket.create_connection(listener.getsockname())
    ours, _ = listener.accept()
    listener.close()
    socket_side, writer = await asyncio.open_connection(sock=ours)
    channel = LateChannel()

    async def application_resets() -> None:
        app.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        app.close()  # RST
        with pytest.raises(ConnectionResetError):
            await socket_side.read()
        # Until the transport has closed, not only begun to (the protocol's connection_lost).
        with contextlib.suppress(ConnectionResetError):
            await writer.wait_closed()
        channel.release.set()

    async with asyncio.timeout(HANG):
        reason, _ = await asyncio.gather(
            pump(asyncio.StreamReader(), writer, channel, Traffic(), idle_timeout_s=HANG),
            application_resets(),
        )
    writer.close()
    return reason


@pytest.mark.parametrize("loop", LOOPS)
def test_data_for_a_reset_plaintext_side_ends_as_a_reset(loop: str) -> None:
    reason = run(loop, reset_then_data)
    assert reason.startswith("error: ConnectionResetError"), reason
