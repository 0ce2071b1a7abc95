"""Move bytes both ways between a plaintext stream and a TLS channel, with half-close.

Backpressure comes from awaiting each write's drain before reading more; buffers are bounded
by the read size. Half-close: EOF on the plaintext side becomes FIN inside the tunnel, and FIN
from the peer becomes a TCP half-close (write_eof) on the plaintext side.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Protocol

from qkdproxy.io.tls_stream import TlsStream

READ_SIZE = 64 * 1024


class Channel(Protocol):
    """The tunnel side: a ``qkdproxy/1`` PeerChannel, or raw TLS for other stacks."""

    async def send(self, data: bytes) -> None: ...

    async def send_fin(self) -> None: ...

    async def receive(self) -> bytes: ...

    async def update_keys(self) -> None: ...

    async def close(self) -> None: ...


class RawTlsChannel:
    """A plain TLS stream (the peer is not a qkdproxy daemon): no framing, no half-close."""

    def __init__(self, stream: TlsStream) -> None:
        self.stream = stream

    async def send(self, data: bytes) -> None:
        """Write application bytes."""
        await self.stream.write(data)

    async def send_fin(self) -> None:
        """Nothing to send: tlslite has no TLS half-close, and closing here would drop the
        peer's answer. The stream ends when the peer closes (or the idle timeout)."""

    async def receive(self) -> bytes:
        """Read application bytes (b"" at the end)."""
        return await self.stream.read()

    async def update_keys(self) -> None:
        """TLS 1.3 KeyUpdate."""
        await self.stream.update_keys()

    async def close(self) -> None:
        """Close the stream."""
        await self.stream.close()


@dataclass(frozen=True, slots=True)
class RekeyBudget:
    """Send a KeyUpdate after this many bytes or seconds (0 turns a limit off)."""

    max_bytes: int = 1 << 30
    max_seconds: float = 3600.0


@dataclass(slots=True)
class Traffic:
    """Bytes moved: ``to_peer`` from the plaintext side, ``from_peer`` to it."""

    to_peer: int = 0
    from_peer: int = 0
    key_updates: int = 0
    last_activity: float = field(default_factory=time.monotonic)
    last_rekey: float = field(default_factory=time.monotonic)
    bytes_since_rekey: int = 0

    def rekey_due(self, budget: RekeyBudget, now: float) -> bool:
        """True when the current traffic keys have carried enough."""
        return bool(budget.max_bytes and self.bytes_since_rekey >= budget.max_bytes) or bool(
            budget.max_seconds and now - self.last_rekey >= budget.max_seconds
        )


async def pump(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    channel: Channel,
    traffic: Traffic,
    *,
    idle_timeout_s: float,
    rekey: RekeyBudget | None = None,
) -> str:
    """Run both directions until both ended; returns why the connection ended."""
    budget = rekey or RekeyBudget()

    async def outbound() -> None:
        while data := await reader.read(READ_SIZE):
            traffic.to_peer += len(data)
            traffic.bytes_since_rekey += len(data)
            traffic.last_activity = now = time.monotonic()
            await channel.send(data)
            if traffic.rekey_due(budget, now):
                await channel.update_keys()
                traffic.key_updates += 1
                traffic.bytes_since_rekey, traffic.last_rekey = 0, now
        await channel.send_fin()

    async def inbound() -> None:
        while data := await channel.receive():
            traffic.from_peer += len(data)
            traffic.last_activity = time.monotonic()
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            with contextlib.suppress(OSError):
                writer.write_eof()

    tasks = {asyncio.create_task(outbound()), asyncio.create_task(inbound())}
    try:
        return await _until_done(tasks, traffic, idle_timeout_s)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _until_done(
    tasks: set[asyncio.Task[None]], traffic: Traffic, idle_timeout_s: float
) -> str:
    pending = set(tasks)
    while pending:
        timeout = None
        if idle_timeout_s:
            timeout = max(0.0, traffic.last_activity + idle_timeout_s - time.monotonic())
        done, pending = await asyncio.wait(
            pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if not done and time.monotonic() - traffic.last_activity >= idle_timeout_s:
            return "idle_timeout"
        for task in done:
            error = task.exception()
            if error is not None:
                return f"error: {type(error).__name__}: {error}"[:200]
    return "closed"
