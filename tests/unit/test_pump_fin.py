"""When the peer has already finished, the pump leaves our FIN to the channel's close (FIN
and close_notify in one write); otherwise it sends FIN as soon as the application ends."""

from __future__ import annotations

import asyncio
import socket

from qkdproxy.daemon.pump import Traffic, pump

STEP_S = 10.0


class ScriptedChannel:
    """The tunnel side: the peer ends when ``peer_ends`` is set; records what we send."""

    def __init__(self) -> None:
        self.peer_ends = asyncio.Event()
        self.asked = asyncio.Event()
        self.fin_sent = asyncio.Event()
        self.sent = bytearray()
        self.fins = 0

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        self.sent += data

    async def send_fin(self) -> None:
        self.fins += 1
        self.fin_sent.set()

    async def receive(self) -> bytes:
        return b""

    async def receive_parts(self) -> list[bytes]:
        self.asked.set()
        await self.peer_ends.wait()
        return []

    async def update_keys(self) -> None:
        pass

    async def close(self) -> None:
        pass


async def _run(
    channel: ScriptedChannel, app_ends_after: asyncio.Event, *, close: bool = True
) -> str:
    ours, app = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=ours)
    _, app_writer = await asyncio.open_connection(sock=app)

    async def application() -> None:
        await app_ends_after.wait()
        app_writer.write(b"request")
        app_writer.write_eof()

    async with asyncio.timeout(STEP_S):
        reason, _ = await asyncio.gather(
            pump(reader, writer, channel, Traffic(), idle_timeout_s=STEP_S, fin_with_close=close),
            application(),
        )
    writer.close()
    app_writer.close()
    return reason


async def test_the_peer_finished_first_so_fin_waits_for_the_close() -> None:
    channel = ScriptedChannel()
    channel.peer_ends.set()
    # The application ends only once the pump has seen the peer's end.
    assert await _run(channel, channel.asked) == "closed"
    assert channel.sent == b"request"
    assert channel.fins == 0  # the channel's close sends it, with close_notify


async def test_a_caller_that_does_not_close_gets_fin_from_the_pump() -> None:
    channel = ScriptedChannel()
    channel.peer_ends.set()
    assert await _run(channel, channel.asked, close=False) == "closed"
    assert channel.fins == 1


async def test_fin_goes_at_once_while_the_peer_still_sends() -> None:
    channel = ScriptedChannel()
    app_ends = asyncio.Event()
    app_ends.set()

    async def peer() -> None:
        await channel.fin_sent.wait()  # the peer hears our FIN before it ends its side
        channel.peer_ends.set()

    results = await asyncio.gather(_run(channel, app_ends), peer())
    assert results[0] == "closed"
    assert channel.fins == 1
