"""The pump's fresh-key task, which starts from a timer when it would first look, over real
loopback sockets and real TLS streams: an Extended Key Update left unfinished still fails
the stream, a connection shorter than the first look reports its updates and the age of
its keys as before, and no ending (the pump's own, or a cancellation from outside, before
or after the timer) leaves a timer, a task or a "destroyed but pending" task behind."""

from __future__ import annotations

import asyncio
import gc
import socket
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import pytest

from qkdproxy.daemon import pump as pump_module
from qkdproxy.daemon.pump import FreshKeyBudget, Traffic, pump
from qkdproxy.io import tls_stream
from qkdproxy.io.peer_channel import PeerChannel
from qkdproxy.keys.sources import KeySources
from tests.integration.test_eku_attack import Clock, stream_pair

# Only a bound for a hang: never reached when the pump works.
HANG = 30.0


@asynccontextmanager
async def plaintext_pair() -> AsyncIterator[
    tuple[asyncio.StreamReader, asyncio.StreamWriter, socket.socket]
]:
    """The pump's plaintext side (a stream pair) and the application's socket."""
    listener = socket.create_server(("127.0.0.1", 0))
    reader, writer = await asyncio.open_connection(sock=socket.create_connection(
        listener.getsockname()
    ))  # fmt: skip
    app, _ = listener.accept()
    listener.close()
    try:
        yield reader, writer, app
    finally:
        writer.close()
        app.close()


class Started:
    """Stands in for pump.refresh_keys: records the tasks it runs in."""

    def __init__(self) -> None:
        self.tasks: list[asyncio.Task[Any]] = []
        self.running = asyncio.Event()
        self._real = pump_module.refresh_keys

    def __call__(self, *args: Any, **kwargs: Any) -> Coroutine[Any, Any, None]:
        async def run() -> None:
            me = asyncio.current_task()
            assert me is not None
            self.tasks.append(me)
            self.running.set()
            await self._real(*args, **kwargs)

        return run()


def pending_first_looks() -> list[asyncio.TimerHandle]:
    """Timers of the running (asyncio) loop that would still start a fresh-key task."""
    loop = asyncio.get_running_loop()
    scheduled: list[asyncio.TimerHandle] = loop._scheduled  # type: ignore[attr-defined]
    return [h for h in scheduled if not h.cancelled() and "start" in repr(h)]


def destroyed_pending() -> list[dict[str, Any]]:
    """What the loop reports of tasks collected while pending, from now on."""
    seen: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    default = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if "destroyed but it is pending" in str(context.get("message")):
            seen.append(context)
        elif default is not None:
            default(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
    return seen


async def test_an_update_the_peer_leaves_unanswered_still_fails_the_stream(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No budget of our own, an update started and never answered: the first look, from
    its timer, fails the stream closed and the pump ends with why (no idle limit, so
    nothing else would end it)."""
    monkeypatch.setattr(pump_module, "FRESH_KEY_POLL_S", 0.01)
    async with stream_pair() as s, plaintext_pair() as (reader, writer, _app):
        clock = Clock()
        monkeypatch.setattr(tls_stream, "time", clock)
        assert await s.client.fresh_key_update()
        clock.now += 11  # past the update's deadline (10 s); the peer never reads
        async with asyncio.timeout(HANG):
            reason = await pump(
                reader, writer, PeerChannel(s.client, KeySources()), Traffic(),
                idle_timeout_s=0, fresh=FreshKeyBudget(max_bytes=0, max_seconds=0),
                stream=s.client,
            )  # fmt: skip
        assert "not finished within" in reason
        assert s.client.fresh_key_stats().failed == 1
        assert s.client_keys.ledger.outstanding == 0


async def test_a_connection_shorter_than_the_first_look_reports_its_updates(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The peer runs an update and the connection ends before our first look: no
    fresh-key task ever ran, yet the connection reports the update and when its keys were
    last fresh (the age metric), and leaves no timer behind."""
    started = Started()
    monkeypatch.setattr(pump_module, "refresh_keys", started)
    monkeypatch.setattr(pump_module, "FRESH_KEY_POLL_S", 3600.0)  # the look: far off
    destroyed = destroyed_pending()
    async with stream_pair() as s, plaintext_pair() as (reader, writer, app):
        traffic = Traffic()
        running = asyncio.create_task(
            pump(
                reader,
                writer,
                PeerChannel(s.client, KeySources()),
                traffic,
                idle_timeout_s=0,
                fresh=FreshKeyBudget(),
                stream=s.client,
            )
        )
        peer = PeerChannel(s.server, KeySources())
        assert await s.server.fresh_key_update()
        app.sendall(b"from the application")
        app.shutdown(socket.SHUT_WR)
        got = bytearray()
        while part := await peer.receive():
            got += part
        assert bytes(got) == b"from the application"
        assert s.server.fresh_key_stats().completed == 1
        # Its last message reaches our side before these, so our side completes too.
        await peer.send(b"from the peer")
        await peer.send_fin()
        async with asyncio.timeout(HANG):
            assert await running == "closed"
        assert traffic.fresh_keys == s.client.fresh_key_stats()
    assert traffic.fresh_keys.completed == 1
    assert traffic.fresh_keys_at is not None
    assert started.tasks == []
    assert pending_first_looks() == []
    gc.collect()
    assert destroyed == []


@pytest.mark.parametrize("when", ["before the first look", "after the first look"])
async def test_a_pump_cancelled_from_outside_leaves_no_fresh_key_task(
    monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """A daemon stopping cancels the connection: before the timer fired (then it never
    does) or after (then its task is cancelled and awaited)."""
    started = Started()
    monkeypatch.setattr(pump_module, "refresh_keys", started)
    poll = 0.001 if when == "after the first look" else 3600.0
    monkeypatch.setattr(pump_module, "FRESH_KEY_POLL_S", poll)
    destroyed = destroyed_pending()
    async with stream_pair() as s, plaintext_pair() as (reader, writer, _app):
        running = asyncio.create_task(
            pump(
                reader,
                writer,
                PeerChannel(s.client, KeySources()),
                Traffic(),
                idle_timeout_s=0,
                fresh=FreshKeyBudget(),
                stream=s.client,
            )
        )
        if when == "after the first look":
            await started.running.wait()
        else:
            await asyncio.sleep(0)  # the pump's first step: its timer is set
            assert len(pending_first_looks()) == 1
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        assert pending_first_looks() == []
        assert all(task.done() for task in started.tasks)
        assert len(started.tasks) == (when == "after the first look")
    gc.collect()
    assert destroyed == []
