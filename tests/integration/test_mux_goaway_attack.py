"""A hostile server against the client's resending of unprocessed streams, between real
daemons: refusing (or disowning) what it is sent must not cost the client more QKD keys
than serving it would."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import Any

import pytest

from qkdproxy.core.mux import ErrorCode, MuxEvent, ResetCode
from qkdproxy.daemon.muxconn import REPLAY_LIMIT, MuxStream, MuxTunnel
from qkdproxy.daemon.tunnel import Tunnel
from tests.integration.test_mux_goaway import MUX, CountingBackend, client_streams
from tests.integration.test_tunnel_runtime import port, setup, transfer


def disown_every_stream(server: Tunnel) -> None:
    """From now on each tunnel ``server`` accepts exchanges SETTINGS, then answers the
    first stream it is sent with REFUSED_STREAM and GOAWAY naming no stream."""
    make = server._mux_tunnel

    def disowning(*args: Any) -> MuxTunnel:
        tunnel = make(*args)
        conn = tunnel.conn
        conn._goaway_last = 0  # every stream refused (RST_STREAM REFUSED_STREAM)
        receive = conn.receive

        def receive_then_go_away(data: bytes | bytearray) -> list[MuxEvent]:
            events = receive(data)
            if conn._last_peer_id:  # a stream came: GOAWAY, last id 0
                conn._goaway(ErrorCode.NO_ERROR)
            return events

        conn.receive = receive_then_go_away  # type: ignore[method-assign]
        return tunnel

    server._mux_tunnel = disowning  # type: ignore[method-assign,assignment]


@pytest.mark.parametrize("at_once", [1, 20])
async def test_a_server_disowning_every_stream_costs_a_key_per_backoff_step(
    tmp_path: Path, at_once: int
) -> None:
    """Nothing processed, every tunnel gone after one stream; connections one after the
    other, or 20 at once. Without a rule, each attempt of a connection (1 + STREAM_RETRIES)
    would establish a tunnel of its own (measured: 18 keys for 6 connections one after
    the other, 9 for 3 waves of 20); a tunnel that disowned streams and answered none is a
    failed establishment, so the keys follow the backoff, not the connections."""
    backend = CountingBackend()
    async with setup(tmp_path, backend) as s, s.daemon("server", s.server_toml(MUX)) as server:
        disown_every_stream(server.tunnels[0])
        text = s.client_toml(port(server), f"{MUX}\nmux_pool_min = 0")
        async with s.daemon("client", text) as client:
            for _ in range(6 if at_once == 1 else 3):
                await asyncio.gather(
                    *(refused(port(client), b"never processed") for _ in range(at_once))
                )
            pool = client.tunnels[0].pool
            assert pool is not None
            taken = client.tunnels[0].keys.ledger.taken
            assert taken >= 1
            # Every key went to a tunnel that processed nothing: each one set a backoff.
            assert taken == pool.establish_failures
    assert backend.received == []
    reasons = [r.reason for r in client_streams(s.records)]
    assert reasons and all(r.startswith("error: not processed by the peer") for r in reasons)


async def refused(client_port: int, payload: bytes) -> None:
    with contextlib.suppress(ConnectionResetError):
        assert await transfer(client_port, payload) == b""


def refuse_first_stream_late(server: Tunnel, opened: int, after: int) -> asyncio.Event:
    """The first stream ``server`` is sent gets ``opened`` bytes of window before any
    answer (as no qkdproxy server gives), then, once ``after`` bytes (or its end) arrived,
    RST_STREAM REFUSED_STREAM: a peer claiming it did not process what it let through.
    Later streams are served. The event is set once the refusal left."""
    make = server._mux_tunnel
    refused = asyncio.Event()

    def hostile(stream: Any, writer: Any, record: Any, on_stream: Any) -> MuxTunnel:

        def first_refused_late(mux: MuxStream) -> None:
            if refused.is_set() or mux.stream_id != 1:
                on_stream(mux)
                return
            refuse_late(mux)

        def refuse_late(stream: MuxStream) -> None:
            conn = tunnel.conn
            conn._streams[stream.stream_id].receive_window += opened
            conn._window_update(stream.stream_id, opened)
            tunnel.flush_soon()
            deliver, got = stream._deliver, [0]

            def counting(data: bytes, flow: int) -> None:
                deliver(data, flow)
                got[0] += len(data)
                if got[0] >= after:
                    refuse()

            def refuse() -> None:
                if not refused.is_set():
                    conn.reset(stream.stream_id, ResetCode.REFUSED_STREAM)
                    stream._release()
                    tunnel.flush_soon()
                    refused.set()

            peer_end = stream._peer_end

            def ended() -> None:
                peer_end()
                refuse()

            stream._deliver = counting  # type: ignore[method-assign]
            stream._peer_end = ended  # type: ignore[method-assign]

        tunnel = make(stream, writer, record, first_refused_late)
        return tunnel

    server._mux_tunnel = hostile  # type: ignore[method-assign]
    return refused


@pytest.mark.parametrize(
    ("size", "after", "resent"),
    [
        (300_000, 300_000, True),  # all of it, and its end, before the refusal
        (900_000, 600_000, True),  # part of it through an early window
        (REPLAY_LIMIT + 1, REPLAY_LIMIT + 1, False),  # more than is kept
        (3 * 1024 * 1024, 2 * 1024 * 1024, False),  # far past what is kept
    ],
)
async def test_a_late_refusal_resends_every_byte_once_in_order_or_nothing(
    tmp_path: Path, size: int, after: int, resent: bool
) -> None:
    """A server that opens the window before its answer, takes part or all of a stream
    (its end too), then resets it REFUSED_STREAM: the client sends it again with exactly
    the bytes the application sent, in order, once; past REPLAY_LIMIT it fails instead
    (no partial resend). Either way the application never sees bytes twice."""
    backend = CountingBackend()
    async with setup(tmp_path, backend) as s, s.daemon("server", s.server_toml(MUX)) as server:
        refused = refuse_first_stream_late(server.tunnels[0], 4 * 1024 * 1024, after)
        async with s.daemon("client", s.client_toml(port(server), MUX)) as client:
            payload = os.urandom(size)
            with contextlib.suppress(ConnectionResetError):
                echoed = await transfer(port(client), payload)
            assert refused.is_set()
            assert client.tunnels[0].keys.ledger.taken == 1
    [line] = client_streams(s.records)
    if resent:
        assert echoed == payload and line.reason == "closed" and line.mux_retries == 1
        assert [bytes(r) for r in backend.received] == [payload]
    else:
        assert line.reason.startswith("error") and line.mux_retries == 0
        assert backend.received == []


@pytest.mark.parametrize("at_once", [False, True])
async def test_a_server_going_away_after_every_stream_costs_a_tunnel_per_live_connection(
    tmp_path: Path, at_once: bool
) -> None:
    """A server that sends GOAWAY right behind the first stream each tunnel takes, and keeps
    that stream open: the pool retires each tunnel at once, so ``mux_pool_max`` (2 here)
    no longer bounds the tunnels; the live connections do (one tunnel and one key each,
    as without multiplexing), and every tunnel ends once its connection did. Three opened
    at once share the first tunnel: it takes one (not answered yet as its GOAWAY arrives)
    and disowns two, which are sent again; such a tunnel did work for its key and is no
    failed establishment, so each of them gets a tunnel in turn."""
    backend = CountingBackend()
    async with setup(tmp_path, backend) as s, s.daemon("server", s.server_toml(MUX)) as server:
        hostile = server.tunnels[0]
        make = hostile._mux_tunnel

        def going_away(stream: Any, writer: Any, record: Any, on_stream: Any) -> MuxTunnel:
            def take_then_go_away(mux: MuxStream) -> None:
                on_stream(mux)
                tunnel.stop_streams()

            tunnel = make(stream, writer, record, take_then_go_away)
            return tunnel

        hostile._mux_tunnel = going_away  # type: ignore[method-assign]
        text = s.client_toml(port(server), f"{MUX}\nmux_pool_min = 0\nmux_pool_max = 2")
        count = 3 if at_once else 5
        async with s.daemon("client", text) as client:
            live = []
            for _ in range(count):
                reader, writer = await asyncio.open_connection("127.0.0.1", port(client))
                writer.write(b"hello")
                if not at_once:  # one after the other: each finds the last tunnel retired
                    assert await reader.readexactly(5) == b"hello"
                live.append((reader, writer))
            if at_once:
                for reader, _ in live:
                    assert await reader.readexactly(5) == b"hello"
            pool = client.tunnels[0].pool
            assert pool is not None
            assert client.tunnels[0].keys.ledger.taken == count
            assert len(pool.tunnels) + len(pool.draining) == count
            for reader, writer in live:
                writer.write_eof()
                assert await reader.read() == b""
                writer.close()
            await asyncio.wait_for(client.tunnels[0].wait_idle(), 10)
            while pool.draining:  # each retired tunnel closes once its stream ended
                await asyncio.wait_for(asyncio.shield(next(iter(pool.draining)).ended.wait()), 10)
                await asyncio.sleep(0)
    lines = client_streams(s.records)
    assert len(lines) == count and all(r.reason == "closed" for r in lines)
    assert sum(r.mux_retries or 0 for r in lines) == (3 if at_once else 0)


def large_locals(minimum: int) -> list[str]:
    """Where qkdproxy's coroutine frames (of running tasks, and what they await) hold
    bytes of at least ``minimum``, directly or in a tuple."""
    found = []
    for task in asyncio.all_tasks() - {asyncio.current_task()}:
        coro: Any = task.get_coro()
        while coro is not None and hasattr(coro, "cr_frame"):
            frame = coro.cr_frame
            ours = frame is not None and "/qkdproxy/" in frame.f_code.co_filename
            for name, value in (frame.f_locals if ours else {}).items():
                values = value if isinstance(value, tuple) else (value,)
                if any(isinstance(v, bytes | bytearray) and len(v) >= minimum for v in values):
                    found.append(f"{frame.f_code.co_name}: {name}")
            coro = coro.cr_await
    return found


async def test_a_resent_connection_does_not_hold_what_it_resent(tmp_path: Path) -> None:
    """Once the stream that carried the resend is accepted, nothing keeps the resent bytes:
    a long-lived connection resent at a rolling restart would otherwise hold up to
    REPLAY_LIMIT (twice) for its whole life."""
    backend = CountingBackend()
    async with setup(tmp_path, backend) as s, s.daemon("server", s.server_toml(MUX)) as server:
        refused = refuse_first_stream_late(server.tunnels[0], 0, 900_000)
        async with s.daemon("client", s.client_toml(port(server), MUX)) as client:
            reader, writer = await asyncio.open_connection("127.0.0.1", port(client))
            payload = os.urandom(900_000)
            writer.write(payload)
            assert await reader.readexactly(len(payload)) == payload  # resent, then echoed
            assert refused.is_set()
            writer.write(b"still open")
            assert await reader.readexactly(10) == b"still open"
            assert large_locals(100_000) == []
            writer.write_eof()
            assert await reader.read() == b""
            writer.close()
    [line] = client_streams(s.records)
    assert line.reason == "closed" and line.mux_retries == 1
