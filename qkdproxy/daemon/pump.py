"""Move bytes both ways between a plaintext stream and a TLS channel, with half-close.

Backpressure comes from awaiting each write's drain before reading more; buffers are bounded
by the read size. Half-close: EOF on the plaintext side becomes FIN inside the tunnel, and FIN
from the peer becomes a TCP half-close (write_eof) on the plaintext side.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from qkdproxy.core.tls.sent import Delivery
from qkdproxy.io import aio
from qkdproxy.io.socket_reader import SocketReader
from qkdproxy.io.tls_stream import FreshKeyStats, TlsStream, TlsStreamError

# 256 KiB, not 128: half the receives, wake-ups and Python calls per byte (about 8 % less
# CPU per GB on one stream, docs/PERFORMANCE.md "Cost of a byte").
READ_SIZE = 256 * 1024


class Channel(Protocol):
    """The tunnel side: a ``qkdproxy/1`` PeerChannel, or raw TLS for other stacks."""

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data``: it may be a view into a buffer that is reused once this returns."""

    async def send_fin(self) -> None: ...

    async def receive(self) -> bytes | bytearray | memoryview: ...

    async def receive_parts(self) -> Sequence[bytes | bytearray | memoryview]:
        """What :meth:`receive` returns, as one or more non-empty buffers (no join); empty
        at the end. They stay valid after the next call (a transport may still hold them)."""
        ...

    async def update_keys(self) -> None: ...

    async def close(self) -> None: ...


class RawTlsChannel:
    """A plain TLS stream (the peer is not a qkdproxy daemon): no framing, no half-close."""

    def __init__(self, stream: TlsStream) -> None:
        self.stream = stream

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        """Write application bytes."""
        await self.stream.write(data, application=True)

    async def send_fin(self) -> None:
        """Nothing to send: tlslite has no TLS half-close, and closing here would drop the
        peer's answer. The stream ends when the peer closes (or the idle timeout)."""

    async def receive(self) -> bytes | bytearray:
        """Read application bytes (b"" at the end)."""
        return await self.stream.read()

    async def receive_parts(self) -> list[bytes | bytearray]:
        """Read application bytes, as one buffer (none at the end)."""
        data = await self.stream.read()
        return [data] if data else []

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


@dataclass(frozen=True, slots=True)
class FreshKeyBudget:
    """Run an Extended Key Update (a fresh key exchange: on a QKD group a fresh QKD key)
    after this many bytes (both directions) or seconds since the last fresh key (0 turns a
    limit off). Independent of :class:`RekeyBudget`."""

    max_bytes: int = 64 << 30
    max_seconds: float = 600.0

    @property
    def active(self) -> bool:
        """True if either limit is on."""
        return bool(self.max_bytes or self.max_seconds)


# How often the fresh-key task looks at the byte budget (the time budget wakes it exactly).
FRESH_KEY_POLL_S = 1.0
# The side that does not originate key ids waits this much longer than its budget says:
# with equal budgets the originator's update comes first, so two peers do not start
# crossing updates (one of which would waste a key) every time.
NON_ORIGINATOR_SLACK = 1.5


@dataclass(slots=True)
class Traffic:
    """Bytes moved: ``to_peer`` from the plaintext side, ``from_peer`` to it."""

    to_peer: int = 0
    from_peer: int = 0
    key_updates: int = 0
    last_activity: float = field(default_factory=time.monotonic)
    last_rekey: float = field(default_factory=time.monotonic)
    bytes_since_rekey: int = 0
    # Extended Key Updates (either side initiating) and the QKD key ids they spent.
    fresh_keys: FreshKeyStats = field(default_factory=FreshKeyStats)
    # When the stream last got fresh keys (monotonic; None: no Extended Key Update).
    fresh_keys_at: float | None = None
    # Each direction ended by its sender: the plaintext side's (our FIN follows every byte
    # it sent) and the peer's (its FIN reached the plaintext side). An end before both is
    # a cut for a direction that moved bytes and did not end (see _close_after_pump).
    sent_end: bool = False
    got_end: bool = False
    # Of from_peer, what a reset of the plaintext side dropped (never passed on): left out
    # of the connection's line, kept in the byte counters (which must never go down).
    dropped: int = 0
    # Of the bytes sent to the peer, those whose records had left when our side dropped
    # what the TLS side still held (a reset, a close cut short); None: no such drop, and
    # to_peer stands. The connection's line says this, the byte counters keep to_peer.
    delivered: Delivery | None = None

    def rekey_due(self, budget: RekeyBudget, now: float) -> bool:
        """True when the current traffic keys have carried enough."""
        return bool(budget.max_bytes and self.bytes_since_rekey >= budget.max_bytes) or bool(
            budget.max_seconds and now - self.last_rekey >= budget.max_seconds
        )


async def pump(
    reader: asyncio.StreamReader | SocketReader,
    writer: asyncio.StreamWriter,
    channel: Channel,
    traffic: Traffic,
    *,
    idle_timeout_s: float,
    rekey: RekeyBudget | None = None,
    fresh: FreshKeyBudget | None = None,
    stream: TlsStream | None = None,
    fin_with_close: bool = False,
    loop: asyncio.AbstractEventLoop | None = None,
) -> str:
    """Run both directions until both ended; returns why the connection ended (``loop``:
    the running loop, if the caller holds it).

    ``fin_with_close``: the caller closes ``channel`` as soon as this returns (the tunnel
    does), so when the peer has finished first our FIN is left to that close, which sends
    it with close_notify in one write. Without it FIN is sent when the plaintext side ends.

    With ``fresh`` and a ``stream`` that negotiated Extended Key Update, a third task runs
    fresh key exchanges on that budget, off the data path: neither direction waits for
    its KME call.
    """
    budget = rekey or RekeyBudget()

    # A read never carries more than the rekey budget: keys protect at most that much.
    read_size = min(READ_SIZE, budget.max_bytes or READ_SIZE)
    # The plaintext socket is read in place (no StreamReader copies); the channel seals or
    # frames each batch before send returns, and only then is the buffer reused.
    source = SocketReader.attach(reader, writer, READ_SIZE)

    inbound_done = False

    async def outbound() -> None:
        while received := await source.peek():
            data = received[:read_size]
            try:
                await channel.send(data)
            finally:
                source.consume(len(data))
            traffic.to_peer += len(data)
            traffic.bytes_since_rekey += len(data)
            traffic.last_activity = now = time.monotonic()
            if traffic.rekey_due(budget, now):
                await channel.update_keys()
                traffic.key_updates += 1
                traffic.bytes_since_rekey, traffic.last_rekey = 0, now
        traffic.sent_end = True
        if not (fin_with_close and inbound_done):
            await channel.send_fin()
        # else the pump ends now, and the caller's close of the channel sends our FIN with
        # its close_notify: one record write, and one wake-up of the peer, fewer.

    async def inbound() -> None:
        nonlocal inbound_done
        while parts := await channel.receive_parts():
            traffic.from_peer += sum(map(len, parts))
            traffic.last_activity = time.monotonic()
            await _write_plaintext(writer, parts)
        inbound_done = True
        if writer.can_write_eof():
            with contextlib.suppress(OSError):
                writer.write_eof()
        traffic.got_end = True

    # Held for the connection's tasks and waits (aio: a look-up is a getpid() on 3.11).
    loop = loop or asyncio.get_running_loop()
    tasks = {loop.create_task(outbound()), loop.create_task(inbound())}
    helpers: set[asyncio.Task[None]] = set()
    first_look = None
    if fresh is not None and stream is not None and stream.fresh_key_updates:
        first_look = _refresh_later(loop, stream, traffic, fresh, helpers)
    try:
        return await _until_done(loop, tasks, traffic, idle_timeout_s)
    finally:
        if first_look is not None:
            first_look.cancel()
        await aio.cancel_all(tasks | helpers)
        if stream is not None:
            traffic.fresh_keys = stream.fresh_key_stats()


async def _write_plaintext(
    writer: asyncio.StreamWriter, parts: Sequence[bytes | bytearray | memoryview]
) -> None:
    """One writelines of the payloads as they were opened: the kernel gathers them (one
    sendmsg), so no byte is copied to join them first."""
    if writer.transport.is_closing():
        # Reset by the application (or backend) while this direction waited: drain raises
        # what closed it, where uvloop's write raises RuntimeError, a fault of ours to read.
        await writer.drain()
        raise ConnectionResetError("the plaintext side closed before the data")
    writer.writelines(parts)
    await writer.drain()


def _refresh_later(
    loop: asyncio.AbstractEventLoop,
    stream: TlsStream,
    traffic: Traffic,
    budget: FreshKeyBudget,
    helpers: set[asyncio.Task[None]],
) -> asyncio.TimerHandle:
    """Start :func:`refresh_keys` (into ``helpers``) when it would first look: an update
    cannot be due earlier, so a connection that ends before costs no task, nor a round of
    the loop for the task's cancellation. What the task would have noted on starting it
    is handed (the byte count) or finds (the last fresh key, for the age metric)."""
    traffic.fresh_keys_at = stream.fresh_keys_at
    mark = traffic.to_peer + traffic.from_peer
    seconds, _ = _fresh_budget(stream, budget)

    def start() -> None:
        helpers.add(
            loop.create_task(refresh_keys(stream, traffic, budget, loop=loop, bytes_mark=mark))
        )

    return loop.call_later(
        max(0.0, _next_look(stream.fresh_keys_at, seconds, time.monotonic())), start
    )


async def refresh_keys(
    stream: TlsStream,
    traffic: Traffic,
    budget: FreshKeyBudget,
    *,
    loop: asyncio.AbstractEventLoop | None = None,
    bytes_mark: int | None = None,
) -> None:
    """Start an Extended Key Update whenever ``budget`` is spent; the clock restarts at
    every completed update, whichever side started it, so two peers with the same budget
    do not both update. Runs even with no budget of its own: an update the peer started
    or left unfinished past its deadline fails the stream (then this returns). ``loop``:
    the running loop, if the caller holds it; ``bytes_mark``: the bytes moved when the
    byte budget's count began (now if not given)."""
    loop = loop or asyncio.get_running_loop()
    if bytes_mark is None:
        bytes_mark = traffic.to_peer + traffic.from_peer
    started = 0.0
    max_seconds, max_bytes = _fresh_budget(stream, budget)
    while True:
        try:
            await stream.check_fresh_key_deadline()
        except TlsStreamError:
            return  # the stream failed closed; the data tasks see it too
        now = time.monotonic()
        if traffic.fresh_keys_at != stream.fresh_keys_at:  # an update completed (either side)
            traffic.fresh_keys_at = stream.fresh_keys_at
            bytes_mark = traffic.to_peer + traffic.from_peer
        since = max(stream.fresh_keys_at, started)
        moved = traffic.to_peer + traffic.from_peer - bytes_mark
        wait = _next_look(since, max_seconds, now)
        if wait <= 0 or (max_bytes and moved >= max_bytes):
            try:
                await stream.fresh_key_update()
            except TlsStreamError:
                return  # the stream failed closed; the data tasks see it too
            started = time.monotonic()
            bytes_mark = traffic.to_peer + traffic.from_peer
            continue
        await aio.sleep(loop, wait)


def _fresh_budget(stream: TlsStream, budget: FreshKeyBudget) -> tuple[float, int]:
    """This side's fresh-key budget (seconds, bytes): the non-originator's is longer."""
    slack = 1.0 if stream.fresh_key_originator else NON_ORIGINATOR_SLACK
    return budget.max_seconds * slack, int(budget.max_bytes * slack)


def _next_look(since: float, max_seconds: float, now: float) -> float:
    """Seconds until the fresh-key task looks again: the time budget's end (the last
    fresh key ``since``) or the next poll of the byte budget, whichever comes first."""
    wait = FRESH_KEY_POLL_S
    if max_seconds:
        wait = min(wait, since + max_seconds - now)
    return wait


async def _until_done(
    loop: asyncio.AbstractEventLoop,
    tasks: set[asyncio.Task[None]],
    traffic: Traffic,
    idle_timeout_s: float,
) -> str:
    """Wait until both directions ended, one failed, or the connection stayed idle for
    ``idle_timeout_s`` (0: no limit). Callbacks decide when: a direction that ends first
    and well, or an idle limit that turns out not to be reached (the last activity moved
    it), costs no wake-up of this task, only of the callback."""
    ended: asyncio.Future[None] = loop.create_future()
    running = len(tasks)

    def end() -> None:
        if not ended.done():
            ended.set_result(None)

    def task_done(task: asyncio.Task[None]) -> None:
        nonlocal running
        running -= 1
        if not running or task.cancelled() or task.exception() is not None:
            end()

    timer: asyncio.TimerHandle | None = None

    def idle_check() -> None:
        nonlocal timer
        left = traffic.last_activity + idle_timeout_s - time.monotonic()
        if left > 0:
            timer = loop.call_later(left, idle_check)
        else:
            end()

    for task in tasks:
        task.add_done_callback(task_done)
    if idle_timeout_s:
        idle_check()
    try:
        await ended
    finally:
        if timer is not None:
            timer.cancel()
        for task in tasks:
            task.remove_done_callback(task_done)
    for task in tasks:
        if task.done() and (error := task.exception()) is not None:
            return f"error: {type(error).__name__}: {error}"[:200]
    # Neither failed: both ended, or the connection went idle.
    return "closed" if not running else "idle_timeout"
