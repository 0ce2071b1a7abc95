"""Admission control: the pure decisions (hand-held clock), the hello deadlines on real
sockets, and a real daemon under a one-source flood while a second source connects."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import uvloop
from prometheus_client import generate_latest

from qkdproxy.core.addresses import TcpAddress, UnixAddress
from qkdproxy.core.admission import (
    Admission,
    AdmissionLimits,
    HelloProgress,
    HelloState,
    Refusal,
    Ticket,
)
from qkdproxy.core.groups import DEFAULT_GROUPS
from qkdproxy.core.hybrid import resolve
from qkdproxy.core.kem import default_registry
from qkdproxy.core.tls.credentials import Credentials, load_trust_anchors
from qkdproxy.core.tls.identity import AllowList
from qkdproxy.core.tls.verify import PeerPolicy
from qkdproxy.daemon import gate
from qkdproxy.daemon import tunnel as tunnel_module
from qkdproxy.daemon.metrics import Metrics, StateCollector, TunnelState
from qkdproxy.io import aio
from qkdproxy.io.socket_reader import SocketReader
from qkdproxy.io.tls_stream import EndpointSettings, HandshakeError, TlsEndpoint
from qkdproxy.keys.context import KeyContext
from qkdproxy.keys.sources import KeySources
from tests.system.test_daemon_system import (
    CONNECTION_MARK,
    SERVER_NAME,
    Harness,
    harness_fixture,  # noqa: F401 - fixture
    pki_fixture,  # noqa: F401 - fixture
)


def limits(**changes: float) -> AdmissionLimits:
    values: dict[str, float] = {
        "max_connections": 10, "max_connections_per_source": 0, "max_handshakes": 6,
        "max_handshakes_per_source": 3, "handshake_rate_per_source": 0,
        "handshake_burst_per_source": 1,
    }  # fmt: skip
    values.update(changes)
    return AdmissionLimits(**values)  # type: ignore[arg-type]


def admit_all(admission: Admission, source: str, count: int, now: float = 0.0) -> list[object]:
    return [admission.admit(source, now) for _ in range(count)]


# ----------------------------------------------------------------------- pure decisions


def test_per_source_handshake_cap_leaves_room_for_other_sources() -> None:
    admission = Admission(limits())
    first = admit_all(admission, "192.0.2.1", 4)
    assert [isinstance(t, Ticket) for t in first] == [True, True, True, False]
    assert first[3] is Refusal.SOURCE_HANDSHAKES
    assert isinstance(admission.admit("192.0.2.2", 0.0), Ticket)
    assert admission.refused == {"source_handshake_limit": 1}


def test_a_finished_handshake_frees_its_slot_but_the_connection_still_counts() -> None:
    admission = Admission(limits(max_connections=3, max_handshakes_per_source=1))
    ticket = admission.admit("a", 0.0)
    assert isinstance(ticket, Ticket)
    assert admission.admit("a", 0.0) is Refusal.SOURCE_HANDSHAKES
    admission.handshake_done(ticket)
    admission.handshake_done(ticket)  # idempotent
    assert admission.handshakes == 0 and admission.connections == 1
    assert isinstance(admission.admit("a", 0.0), Ticket)
    admission.release(ticket)
    admission.release(ticket)
    assert admission.connections == 1


def test_tunnel_wide_caps_connections_then_handshakes() -> None:
    admission = Admission(limits(max_connections=2, max_handshakes=5))
    admit_all(admission, "a", 1)
    admit_all(admission, "b", 1)
    assert admission.admit("c", 0.0) is Refusal.CONNECTION_LIMIT
    busy = Admission(limits(max_handshakes=2))
    admit_all(busy, "a", 1)
    admit_all(busy, "b", 1)
    assert busy.admit("c", 0.0) is Refusal.HANDSHAKE_LIMIT


def test_per_source_connection_cap_counts_established_connections() -> None:
    admission = Admission(limits(max_connections_per_source=2))
    tickets = admit_all(admission, "a", 2)
    for ticket in tickets:
        assert isinstance(ticket, Ticket)
        admission.handshake_done(ticket)
    assert admission.admit("a", 0.0) is Refusal.SOURCE_CONNECTIONS
    assert isinstance(admission.admit("b", 0.0), Ticket)


def test_handshake_rate_per_source_refills_with_time() -> None:
    admission = Admission(
        limits(max_handshakes_per_source=0, handshake_rate_per_source=2,
               handshake_burst_per_source=2, max_handshakes=0, max_connections=100)
    )  # fmt: skip
    assert [isinstance(t, Ticket) for t in admit_all(admission, "a", 3)] == [True, True, False]
    assert admission.admit("a", 0.0) is Refusal.SOURCE_RATE
    assert isinstance(admission.admit("b", 0.0), Ticket)
    assert isinstance(admission.admit("a", 0.5), Ticket)


def test_refused_attempts_do_not_spend_the_rate_budget() -> None:
    admission = Admission(
        limits(max_handshakes_per_source=1, handshake_rate_per_source=1,
               handshake_burst_per_source=2)
    )  # fmt: skip
    ticket = admission.admit("a", 0.0)
    assert isinstance(ticket, Ticket)
    assert admit_all(admission, "a", 50) == [Refusal.SOURCE_HANDSHAKES] * 50
    admission.release(ticket)
    assert isinstance(admission.admit("a", 0.0), Ticket)


def test_update_keeps_counts_and_applies_new_caps() -> None:
    admission = Admission(limits())
    admit_all(admission, "a", 2)
    admission.update(limits(max_handshakes_per_source=2, handshake_rate_per_source=5))
    assert admission.admit("a", 0.0) is Refusal.SOURCE_HANDSHAKES
    assert admission.connections == 2


def test_source_tables_are_emptied_when_connections_close() -> None:
    admission = Admission(limits(max_connections=10_000, max_handshakes=0,
                                 handshake_rate_per_source=1000, handshake_burst_per_source=5))  # fmt: skip
    tickets = [admission.admit(f"10.0.{i // 250}.{i % 250}", 0.0) for i in range(1000)]
    for ticket in tickets:
        assert isinstance(ticket, Ticket)
        admission.release(ticket)
    assert admission.connections == 0
    assert not admission._connections and not admission._handshakes


def record(body: bytes, content_type: int = 0x16) -> bytes:
    return bytes([content_type, 3, 1]) + len(body).to_bytes(2, "big") + body


HELLO_BODY = b"\x01" + (600).to_bytes(3, "big") + os.urandom(600)


@pytest.mark.parametrize(
    "chunks",
    [
        [record(HELLO_BODY)],
        [bytes([b]) for b in record(HELLO_BODY)],  # one byte at a time
        [record(HELLO_BODY[:3]), record(HELLO_BODY[3:300]), record(HELLO_BODY[300:])],
    ],
    ids=["whole", "bytewise", "three-records"],
)
def test_hello_progress_completes_exactly_at_the_last_byte(chunks: list[bytes]) -> None:
    data = b"".join(chunks)
    progress = HelloProgress()
    assert progress.state is HelloState.NOTHING
    for i in range(len(data) - 1):
        assert progress.feed(data[i : i + 1]) is HelloState.STARTED
    assert progress.feed(data[-1:]) is HelloState.COMPLETE
    assert progress.feed(b"more") is HelloState.COMPLETE


@pytest.mark.parametrize(
    "data",
    [b"GET / HTTP/1.1\r\n", record(b"x" * 10, content_type=0x17), b"\x16\x03\x01\xff\xff",
     b"\x16\x03\x01\x00\x00"],
    ids=["http", "app-data", "oversized-record", "empty-record"],
)  # fmt: skip
def test_hello_progress_leaves_non_hellos_to_the_tls_code(data: bytes) -> None:
    assert HelloProgress().feed(data) is HelloState.COMPLETE


# ----------------------------------------------------------------- deadlines on sockets


async def _deadline_outcome(send: bytes | None, first_byte_s: float, hello_s: float) -> str:
    """Serve one connection whose 'handshake' waits for EOF, under the hello deadlines."""
    outcome: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def handler(
        reader: asyncio.StreamReader | SocketReader, writer: asyncio.StreamWriter
    ) -> None:
        assert isinstance(reader, gate.WatchedReader)  # a TLS listener's
        try:
            await gate.within_hello_deadlines(reader, reader.read(), first_byte_s, hello_s)
            outcome.set_result("completed")
        except gate.HelloDeadlineError as exc:
            outcome.set_result(exc.refusal.value)
        finally:
            writer.close()

    server = await gate.start_server(handler, host="127.0.0.1", port=0)
    port = server.sockets[0].getsockname()[1]
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if send is not None:
            writer.write(send)
            await writer.drain()
        return await asyncio.wait_for(outcome, 10)
    finally:
        writer.close()
        server.close()


async def _accepted(watch_hello: bool) -> tuple[bool, bool]:
    """Accept one TCP connection through :func:`gate.start_server` (a TLS listener, or a
    plaintext one read in place): whether its socket has SO_KEEPALIVE, and whether its
    reader watches the hello (else: is a socket reader)."""
    accepted: asyncio.Future[tuple[bool, bool]] = asyncio.get_running_loop().create_future()

    async def handler(
        reader: asyncio.StreamReader | SocketReader, writer: asyncio.StreamWriter
    ) -> None:
        sock = writer.get_extra_info("socket")
        keepalive = bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE))
        kind = isinstance(reader, gate.WatchedReader if watch_hello else SocketReader)
        accepted.set_result((keepalive, kind))
        writer.close()

    read_size = None if watch_hello else 64 * 1024
    server = await gate.start_server(
        handler, plaintext_read_size=read_size, host="127.0.0.1", port=0
    )
    port = server.sockets[0].getsockname()[1]
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        return await asyncio.wait_for(accepted, 10)
    finally:
        writer.close()
        server.close()


@pytest.mark.parametrize("loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop])
@pytest.mark.parametrize("watch_hello", [True, False])
def test_accepted_connections_keep_alive_and_watch_hellos_only_when_asked(
    loop_factory: Callable[[], asyncio.AbstractEventLoop], watch_hello: bool
) -> None:
    # SO_KEEPALIVE is set on the listener only (Linux copies it to accepted sockets), under
    # the daemon's event loop (uvloop) as well as asyncio's.
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        assert runner.run(_accepted(watch_hello)) == (True, True)


async def _dialled_keep_alive(tmp: Path) -> tuple[bool, bool]:
    """Dial a TCP listener the ways a tunnel does (to its peer, to a backend) and a unix
    one (a backend): whether each TCP socket has SO_KEEPALIVE; the unix dial must work."""
    loop = asyncio.get_running_loop()
    server = await asyncio.start_server(lambda _r, w: w.close(), "127.0.0.1", 0)
    unix = await asyncio.start_unix_server(lambda _r, w: w.close(), str(tmp / "backend"))
    port = server.sockets[0].getsockname()[1]
    try:
        _, peer = await aio.open_connection(loop, "127.0.0.1", port)
        gate.keep_dialled_alive(peer)
        _, backend = await tunnel_module._open(TcpAddress("127.0.0.1", port), loop)
        _, local = await tunnel_module._open(UnixAddress(str(tmp / "backend")), loop)
        kept = tuple(
            bool(w.get_extra_info("socket").getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE))
            for w in (peer, backend)
        )
        for writer in (peer, backend, local):
            writer.close()
            await writer.wait_closed()
        return kept  # type: ignore[return-value]
    finally:
        for listener in (server, unix):
            listener.close()
            await listener.wait_closed()


@pytest.mark.parametrize("loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop])
def test_dialled_tcp_connections_keep_alive(
    loop_factory: Callable[[], asyncio.AbstractEventLoop], tmp_path: Path
) -> None:
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        assert runner.run(_dialled_keep_alive(tmp_path)) == (True, True)


async def test_a_connection_queued_on_an_inherited_listener_keeps_alive_too() -> None:
    # systemd passes a socket that is listening already: a connection may wait in its
    # backlog before the daemon sets anything on the listener.
    listener = socket.create_server(("127.0.0.1", 0))
    peer = socket.create_connection(listener.getsockname())
    accepted: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    async def handler(_: asyncio.StreamReader | SocketReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        accepted.set_result(bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)))
        writer.close()

    server = await gate.start_server(handler, sock=listener)
    try:
        assert await asyncio.wait_for(accepted, 10)
    finally:
        peer.close()
        server.close()


async def test_a_silent_client_is_cut_at_the_first_byte_deadline() -> None:
    assert await _deadline_outcome(None, 0.2, 5.0) == "first_byte_timeout"


async def test_a_partial_hello_is_cut_at_the_hello_deadline() -> None:
    assert await _deadline_outcome(record(HELLO_BODY)[:50], 0.2, 0.4) == "hello_timeout"


async def test_after_a_complete_hello_only_the_handshake_timeout_applies() -> None:
    # The "handshake" here runs until the client closes (the test's finally): were the
    # hello deadline still armed it would fire first.
    async def outcome() -> str:
        return await _deadline_outcome(record(HELLO_BODY), 0.1, 0.1)

    task = asyncio.ensure_future(outcome())
    done, _ = await asyncio.wait({task}, timeout=0.6)
    assert not done  # still waiting: no deadline fired after the complete hello
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


# ---------------------------------------------------------- real daemon under a flood


def legit_endpoint(pki_dir: Path) -> TlsEndpoint:
    policy = PeerPolicy(load_trust_anchors(pki_dir / "ca.pem"), AllowList((), True), SERVER_NAME)
    settings = EndpointSettings(
        Credentials.load(pki_dir / "tunnel-client.pem", pki_dir / "tunnel-client-key.pem"),
        policy, [resolve(DEFAULT_GROUPS.by_name("X25519MLKEM768"), default_registry())], KeyContext(KeySources()),
        handshake_timeout=5.0, peer_protocol=False,
    )  # fmt: skip
    return TlsEndpoint(settings)


async def legit_exchange(endpoint: TlsEndpoint, port: int) -> bool:
    """One TLS connection from 127.0.0.2 through the server daemon to the echo backend."""
    try:
        async with asyncio.timeout(5.0):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, local_addr=("127.0.0.2", 0)
            )
            stream = await endpoint.connect(reader, writer)
            await stream.write(b"ping")
            answer = await stream.read()
            await stream.close()
            return answer == b"ping"
    except (OSError, TimeoutError, HandshakeError, ConnectionError):
        return False


async def squatter(port: int, stop: asyncio.Event, connects: list[int]) -> None:
    """Hold a silent socket from 127.0.0.1; reconnect (20 ms later) whenever it is cut."""
    while not stop.is_set():
        with contextlib.suppress(OSError):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            connects[0] += 1
            read = asyncio.ensure_future(reader.read())
            halt = asyncio.ensure_future(stop.wait())
            with contextlib.suppress(OSError):
                await asyncio.wait({read, halt}, return_when=asyncio.FIRST_COMPLETED)
            read.cancel()
            halt.cancel()
            writer.transport.abort()
        await asyncio.sleep(0.02)


async def test_one_source_holding_100_idle_sockets_does_not_stop_another(
    harness: Harness,
) -> None:
    _, backend_port = await harness.backend()
    config = await harness.server_config(
        "server.toml", backend_port,
        {"kme": None, "policy": "pq-required", "groups": ["X25519MLKEM768"],
         "first_byte_timeout_s": 1.0, "max_handshakes_per_source": 20},
    )  # fmt: skip
    server = await harness.daemon(config)
    endpoint = legit_endpoint(harness.pki)
    stop, connects = asyncio.Event(), [0]
    squatters = [asyncio.ensure_future(squatter(server.port, stop, connects)) for _ in range(100)]
    lines_before = len(server.proc.lines)
    started = time.monotonic()
    try:
        await asyncio.sleep(0.5)  # let the squatters take every slot they can
        results = []
        for _ in range(20):
            results.append(await legit_exchange(endpoint, server.port))
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.gather(*squatters, return_exceptions=True)
    elapsed = time.monotonic() - started
    await asyncio.sleep(0.3)  # the last lines of the window reach the collector
    window = server.proc.lines[lines_before:]
    flood_lines = [line for line in window if '"client":"127.0.0.2"' not in line]
    assert sum(results) >= 18, (results, window[-20:])
    # The squatters connected hundreds of times; every refusal and late hello was counted
    # but at most one line per reason per 10 s made it to the log.
    assert connects[0] > 200
    assert len(flood_lines) <= 6, flood_lines
    assert sum(CONNECTION_MARK in line for line in window) <= 20 + 6
    assert elapsed < 15


def test_refusals_are_exported_by_reason() -> None:
    metrics = Metrics()
    collector = StateCollector()
    metrics.registry.register(collector)
    admission = Admission(limits(max_handshakes_per_source=1))
    admit_all(admission, "192.0.2.1", 3)
    admission.count(Refusal.FIRST_BYTE_TIMEOUT)
    collector.tunnels.append(
        TunnelState("t", "server", lambda: 1, dict,
                    lambda: {"opened": 1, "rejected": 0, "fallbacks": 0},
                    refusals=lambda: dict(admission.refused))
    )  # fmt: skip
    text = generate_latest(metrics.registry).decode()
    assert (
        'qkdproxy_admission_refusals_total{reason="source_handshake_limit",role="server",tunnel="t"} 2.0'
        in text
    )
    assert (
        'qkdproxy_admission_refusals_total{reason="first_byte_timeout",role="server",tunnel="t"} 1.0'
        in text
    )
