"""Hostile peers on real loopback sockets: malformed, replayed and forged hellos.

Server side: an attacker talks raw bytes to a server TlsEndpoint; every case must end with a
HandshakeError at the server and, for the attacker, a plaintext alert or a close (never a
hung connection, never an error on the event loop), and without spending QKD keys it should
not. Client side: a raw malicious server answers a real client's ClientHello.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qkdproxy.core.accounting import KeyLedger
from qkdproxy.core.hybrid import KEY_ID_SIZE, ZERO_KEY_ID, HybridKem
from qkdproxy.core.keys import QkdKey
from qkdproxy.core.tls.hello import (
    EXT_KEY_SHARE,
    ClientHello,
    KeyShareEntry,
    ServerHello,
    parse_client_hello,
    parse_server_hello,
)
from qkdproxy.core.tls.keyexchange import (
    ClientKeyExchange,
    Flow,
    HandshakeRejectedError,
    QkdOptions,
    ServerKeyExchange,
)
from qkdproxy.core.tls.wire import Alert, HandshakeType, plaintext_alert
from qkdproxy.io.tls_stream import HandshakeError, TlsEndpoint, TlsStream, TlsStreamError
from qkdproxy.keys.context import KeyContext
from qkdproxy.keys.key_supply import run
from qkdproxy.keys.sources import KeySources, MasterKeySource, SlaveKeySource
from qkdproxy.sim.inprocess import InProcessQkdLink
from qkdproxy.tools.loopback import LoopbackPair, loopback_pair, resolve_groups
from tests.integration.test_wire_hello import (
    CCS_RECORD,
    IO_DEADLINE,
    FailureLog,
    capture_client_hello,
    client_key_share_ext,
    close_writer,
    ext,
    first_message,
    handshake_message,
    join_client_hello,
    read_first_message,
    records,
    send_raw,
    server_hello_body,
    settle,
    split_client_hello,
    split_first_message,
    u16,
)

QKD = "qkd_mlkem768"
PQ = "X25519MLKEM768"
CLASSICAL = "x25519"
ALERT_PREFIX = b"\x15\x03\x03\x00\x02\x02"
SHORT_TIMEOUT = 0.3
INTRUDER_URI = "spiffe://qkdproxy.test/intruder"
EXT_SUPPORTED_VERSIONS = 43

NETWORK = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@functools.cache
def hybrid(name: str) -> HybridKem:
    [resolved] = resolve_groups([name])
    return resolved


def kems(*names: str) -> list[HybridKem]:
    return [hybrid(n) for n in names]


LoopErrors = list[dict[str, Any]]


@pytest.fixture(autouse=True)
async def quiet_loop() -> AsyncIterator[LoopErrors]:
    """Fail the test if anything reached the loop's exception handler; settle all tasks."""
    loop = asyncio.get_running_loop()
    errors: LoopErrors = []
    previous = loop.get_exception_handler()

    def collect(_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        errors.append(context)

    loop.set_exception_handler(collect)
    try:
        yield errors
        await settle()
    finally:
        loop.set_exception_handler(previous)
    assert errors == []


# ------------------------------------------------------------------------------ helpers


@dataclass(slots=True)
class Target:
    """A server endpoint under attack: the loopback pair, where to dial, what failed there."""

    pair: LoopbackPair
    port: int
    failures: FailureLog


@asynccontextmanager
async def target(
    names: tuple[str, ...] = (QKD,), handshake_timeout: float | None = None
) -> AsyncIterator[Target]:
    """The loopback server, or (with ``handshake_timeout``) a twin of it with that timeout.

    The twin shares the pair's credentials, policy, groups and key context (same ledger).
    """
    failures = FailureLog()
    async with loopback_pair(kems(*names), server_failures=failures) as pair:
        if handshake_timeout is None:
            yield Target(pair, pair.port, failures)
            return
        endpoint = TlsEndpoint(replace(pair.server.settings, handshake_timeout=handshake_timeout))

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                stream = await endpoint.accept(reader, writer)
            except Exception as exc:
                failures.append(exc)
                return
            await stream.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        try:
            yield Target(pair, server.sockets[0].getsockname()[1], failures)
        finally:
            server.close()
            await server.wait_closed()


async def attack(port: int, payload: bytes, *, eof: bool = False) -> bytes:
    """Send raw bytes (then EOF if asked); return everything the server sent before closing."""
    return await send_raw(port, payload, lambda reader: reader.read(), eof=eof)


def assert_alert_or_close(answer: bytes) -> None:
    """The attacker saw a plaintext fatal alert, or nothing before the close."""
    if answer:
        assert len(answer) == 7, answer[:16].hex()
        assert answer.startswith(ALERT_PREFIX), answer.hex()


async def server_error(t: Target) -> HandshakeError:
    exc = await t.failures.wait_for()
    assert isinstance(exc, HandshakeError), repr(exc)
    return exc


async def capture(pair: LoopbackPair, names: tuple[str, ...] = (QKD,), **options: Any) -> bytes:
    """A real client's ClientHello; its QKD key (if any) now waits at the server's end."""
    return await capture_client_hello(pair.client(kems(*names), QkdOptions(**options)))


def client_share(hello_records: bytes) -> bytes:
    return parse_client_hello(first_message(hello_records)[4:]).key_shares[0].key_exchange


def with_share(hello_records: bytes, share: bytes) -> bytes:
    """The captured hello with its key share replaced by one of the same length."""
    old = client_share(hello_records)
    assert len(share) == len(old)
    assert hello_records.count(old) == 1
    return hello_records.replace(old, share)


def with_key_id(hello_records: bytes, key_id: bytes) -> bytes:
    share = client_share(hello_records)
    return with_share(hello_records, share[:-KEY_ID_SIZE] + key_id)


def reencoded(hello_records: bytes, share: bytes) -> bytes:
    """The captured hello with a key share of any length (every length field re-encoded)."""
    body = first_message(hello_records)[4:]
    prefix, extensions = split_client_hello(body)
    group = parse_client_hello(body).key_shares[0].group
    new_ext = client_key_share_ext([(group, share)])[4:]
    changed = [(t, new_ext if t == EXT_KEY_SHARE else d) for t, d in extensions]
    return records(
        handshake_message(HandshakeType.CLIENT_HELLO, join_client_hello(prefix, changed))
    )


def ledger_state(ledger: KeyLedger) -> tuple[int, int, int]:
    return ledger.taken, ledger.consumed, ledger.wasted


def assert_settled(ledger: KeyLedger) -> None:
    assert ledger.taken == ledger.consumed + ledger.wasted
    assert ledger.outstanding == 0


async def echo(stream: TlsStream) -> None:
    """Prove a stream works end to end, then close it."""
    await stream.write(b"ping")
    assert await asyncio.wait_for(stream.read(), IO_DEADLINE) == b"ping"
    await stream.close()


@dataclass(slots=True)
class SourceLog:
    """Every call a wrapped key-source pair saw, and the key ids it handed out."""

    taken: list[bytes] = field(default_factory=list)
    fetched: list[bytes] = field(default_factory=list)
    slave_calls: int = 0
    master_calls: int = 0

    @property
    def key_ids(self) -> list[bytes]:
        return self.taken + self.fetched


@dataclass(frozen=True, slots=True)
class LoggingMaster:
    inner: MasterKeySource
    log: SourceLog

    async def take_key(self) -> QkdKey:
        self.log.master_calls += 1
        key = await self.inner.take_key()
        self.log.taken.append(key.key_id)
        return key


@dataclass(frozen=True, slots=True)
class LoggingSlave:
    inner: SlaveKeySource
    log: SourceLog

    async def get_key(self, key_id: bytes) -> QkdKey:
        self.log.slave_calls += 1
        key = await self.inner.get_key(key_id)
        self.log.fetched.append(key.key_id)
        return key


def log_sources(context: KeyContext) -> SourceLog:
    """Wrap a key context's ETSI 014 sources (in place: the endpoint holds this object)."""
    log, sources = SourceLog(), context.sources
    assert sources.master is not None
    assert sources.slave is not None
    context.sources = KeySources(
        LoggingMaster(sources.master, log), LoggingSlave(sources.slave, log), sources.stream
    )
    return log


class RecordingRelay:
    """A TCP relay in front of a server that records what clients send through it.

    Leaving it waits (bounded) until every relayed connection ended both ways, so nothing
    it relays overlaps what the test does next."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.client_bytes = bytearray()
        self.server_bytes = bytearray()
        self.port = 0
        self._server: asyncio.Server | None = None
        # Python 3.11's server protocol drops its handler task once the client's side
        # ended, and a stream opened with open_connection is held only weakly by its
        # protocol: a handler still waiting for the server's last bytes is then garbage,
        # and a collection destroys it while pending. Held here until it ends.
        self._handlers: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> RecordingRelay:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        if self._handlers:
            _, pending = await asyncio.wait(set(self._handlers), timeout=IO_DEADLINE)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        try:
            await asyncio.gather(
                _pipe(reader, up_writer, self.client_bytes),
                _pipe(up_reader, writer, self.server_bytes),
            )
        finally:
            await close_writer(up_writer)
            await close_writer(writer)


async def _pipe(
    source: asyncio.StreamReader, sink: asyncio.StreamWriter, record: bytearray | None
) -> None:
    # OSError: shutting down a socket the far side already reset raises ENOTCONN.
    with contextlib.suppress(OSError):
        while data := await source.read(65536):
            if record is not None:
                record += data
            sink.write(data)
            await sink.drain()
        if sink.can_write_eof():
            sink.write_eof()


# ------------------------------------------------------------------ server: raw garbage


@NETWORK
@given(garbage=st.binary(min_size=1, max_size=3000))
async def test_server_refuses_garbage(garbage: bytes) -> None:
    async with target() as t:
        answer = await attack(t.port, garbage, eof=True)
        await server_error(t)
        assert_alert_or_close(answer)
        assert t.pair.server_keys.ledger.taken == 0


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", id="http"),
        pytest.param(b"\x16\x03\x01\x00", id="partial-header"),
        pytest.param(b"\x16\x03\x01\x00\x20" + bytes(10), id="partial-record"),
    ],
)
async def test_server_refuses_garbage_without_eof(payload: bytes) -> None:
    async with target(handshake_timeout=SHORT_TIMEOUT) as t:
        answer = await attack(t.port, payload)
        await server_error(t)
        assert_alert_or_close(answer)


# ------------------------------------------------------------- server: truncated hellos


@pytest.mark.parametrize("keep", [1, 5, 9, 200, -1])
async def test_server_refuses_truncated_hello_then_eof(keep: int) -> None:
    async with target() as t:
        hello = await capture(t.pair)
        answer = await attack(t.port, hello[:keep], eof=True)
        exc = await server_error(t)
        assert exc.reason == "peer closed the connection during the handshake"
        assert answer == b""
        assert t.pair.server_keys.ledger.taken == 0
        assert t.pair.link.keys_in_flight == 1  # the client's key was never fetched


@pytest.mark.parametrize("keep", [5, -1])
async def test_server_times_out_on_truncated_hello_then_silence(keep: int) -> None:
    async with target(handshake_timeout=SHORT_TIMEOUT) as t:
        hello = await capture(t.pair)
        answer = await attack(t.port, hello[:keep])
        exc = await server_error(t)
        assert exc.reason == "handshake timed out"
        assert answer == b""
        assert t.pair.server_keys.ledger.taken == 0


# ----------------------------------------------------------- server: oversized records


async def test_server_refuses_an_oversized_record_header_without_waiting_for_its_body() -> None:
    """The header alone is enough to refuse: nothing is buffered for the length it claims
    (tlslite waited for the body, so this ended in a time-out)."""
    async with target(handshake_timeout=SHORT_TIMEOUT) as t:
        answer = await attack(t.port, b"\x16\x03\x01" + u16(2**14 + 1000))
        exc = await server_error(t)
        assert exc.alert == Alert.RECORD_OVERFLOW
        assert answer == b"\x15\x03\x03\x00\x02\x02\x16"


@pytest.mark.parametrize(
    "length", [pytest.param(2**14 + 1000, id="2^14+1000"), pytest.param(0xFFFF, id="0xffff")]
)
async def test_server_refuses_oversized_record(length: int) -> None:
    async with target() as t:
        payload = b"\x16\x03\x01" + u16(length) + bytes(length)
        answer = await attack(t.port, payload)
        exc = await server_error(t)
        assert exc.alert == 22  # record_overflow (the engine's own check)
        assert_alert_or_close(answer)


# ---------------------------------------------------------------- server: forged shares


async def test_server_refuses_random_public_key_without_taking_a_key() -> None:
    async with target() as t:
        hello = await capture(t.pair)
        share = client_share(hello)
        # Random bytes are (overwhelmingly) not a valid ML-KEM-768 key: fails its modulus check.
        forged = with_share(hello, os.urandom(len(share) - KEY_ID_SIZE) + share[-KEY_ID_SIZE:])
        answer = await attack(t.port, forged)
        exc = await server_error(t)
        assert exc.alert == Alert.ILLEGAL_PARAMETER
        assert answer == plaintext_alert(Alert.ILLEGAL_PARAMETER)
        assert t.pair.server_keys.ledger.taken == 0
        assert t.pair.link.keys_in_flight == 1


async def test_server_spends_the_key_on_a_foreign_public_key_and_wastes_it() -> None:
    """A valid public key the attacker made, with a genuine key id: the server answers."""
    async with target() as t:
        hello = await capture(t.pair)
        key_id = client_share(hello)[-KEY_ID_SIZE:]
        _, public = hybrid(QKD).generate()
        answer = await exchange_first_message(t.port, with_share(hello, public + key_id))
        exc = await server_error(t)
        assert exc.reason == "peer closed the connection during the handshake"
        assert answer[0] == 0x16  # a ServerHello
        ledger = t.pair.server_keys.ledger
        assert (ledger.taken, ledger.consumed, ledger.wasted) == (1, 0, 1)
        assert ledger.wasted_by_reason == {"handshake_failed": 1}
        assert t.pair.link.keys_in_flight == 0


async def exchange_first_message(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        await writer.drain()
        return await asyncio.wait_for(read_first_message(reader), IO_DEADLINE)
    finally:
        await close_writer(writer)


@pytest.mark.parametrize("length", [1, KEY_ID_SIZE, 1199, 1201, 1216, 4000])
async def test_server_refuses_wrong_length_share_on_the_wire(length: int) -> None:
    async with target() as t:
        hello = await capture(t.pair)
        share = client_share(hello)
        forged = (share * 4)[: length - KEY_ID_SIZE] + share[-KEY_ID_SIZE:]
        forged = forged if length >= KEY_ID_SIZE else share[:length]
        answer = await attack(t.port, reencoded(hello, forged))
        exc = await server_error(t)
        assert exc.alert == Alert.ILLEGAL_PARAMETER
        assert answer == plaintext_alert(Alert.ILLEGAL_PARAMETER)
        assert t.pair.server_keys.ledger.taken == 0
        assert t.pair.link.keys_in_flight == 1


async def test_reencoding_an_unchanged_share_still_works() -> None:
    """Guards the helper above: re-encoding the genuine share gives a hello the server takes."""
    async with target() as t:
        hello = await capture(t.pair)
        answer = await exchange_first_message(t.port, reencoded(hello, client_share(hello)))
        assert first_message(answer)[0] == HandshakeType.SERVER_HELLO
        await server_error(t)
        assert t.pair.server_keys.ledger.taken == 1


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(length=st.integers(min_value=0, max_value=3000).filter(lambda n: n != 1184))
async def test_wrong_length_share_costs_no_key_in_memory(length: int) -> None:
    link = InProcessQkdLink()
    master = link.sources("a").master
    assert master is not None
    genuine = await master.take_key()
    context = KeyContext(link.sources("b"))
    kex = ServerKeyExchange(kems(QKD), context)
    code = hybrid(QKD).group.code_point
    hello = ClientHello(
        supported_groups=(code,),
        key_shares=(KeyShareEntry(code, bytes(length) + genuine.key_id),),
        versions=(0x0304,),
        cipher_suites=(0x1301,),
    )
    with pytest.raises(HandshakeRejectedError) as info:
        await run(kex.on_client_hello(hello))
    assert info.value.alert == Alert.ILLEGAL_PARAMETER
    await run(kex.finish(False))
    assert ledger_state(context.ledger) == (0, 0, 0)
    assert link.keys_in_flight == 1


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(length=st.integers(min_value=1, max_value=3000).filter(lambda n: n != 1088 + 16))
async def test_wrong_length_server_share_wastes_the_client_key_in_memory(length: int) -> None:
    link = InProcessQkdLink()
    context = KeyContext(link.sources("a"))
    kex = ClientKeyExchange(kems(QKD), context)
    code = hybrid(QKD).group.code_point
    await run(kex.offer(code))
    assert context.ledger.taken == 1
    with pytest.raises(HandshakeRejectedError) as info:
        await run(kex.on_server_hello(ServerHello(False, code, bytes(length))))
    assert info.value.alert == Alert.ILLEGAL_PARAMETER
    await run(kex.finish(False))
    assert ledger_state(context.ledger) == (1, 0, 1)


# ------------------------------------------------------------------ server: key ids


@NETWORK
@given(key_id=st.binary(min_size=KEY_ID_SIZE, max_size=KEY_ID_SIZE).filter(any))
async def test_server_refuses_unknown_key_id(key_id: bytes) -> None:
    async with target() as t:
        hello = await capture(t.pair)
        if client_share(hello)[-KEY_ID_SIZE:] == key_id:
            return  # hypothesis guessed a fresh UUID: not the case under test
        log = log_sources(t.pair.server_keys)
        answer = await attack(t.port, with_key_id(hello, key_id))
        exc = await server_error(t)
        assert exc.alert == Alert.ILLEGAL_PARAMETER
        assert answer == plaintext_alert(Alert.ILLEGAL_PARAMETER)
        assert t.pair.server_keys.ledger.taken == 0
        assert (log.slave_calls, log.master_calls, log.key_ids) == (1, 0, [])
        assert t.pair.link.keys_in_flight == 1


async def test_server_refuses_a_replayed_client_hello_without_asking_the_kme() -> None:
    async with target() as t:
        log = log_sources(t.pair.server_keys)
        client = t.pair.client(kems(QKD), QkdOptions())
        async with RecordingRelay(t.port) as relay:
            reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
            stream = await asyncio.wait_for(client.connect(reader, writer), IO_DEADLINE)
            await echo(stream)
        hello = split_first_message(bytes(relay.client_bytes))
        assert hello is not None
        assert stream.record.qkd_key_id is not None
        assert (log.slave_calls, t.pair.server_keys.ledger.taken) == (1, 1)

        answer = await attack(t.port, hello)
        exc = await server_error(t)
        assert exc.alert == Alert.ILLEGAL_PARAMETER
        assert exc.reason == "QKD key id was already used"
        assert answer == plaintext_alert(Alert.ILLEGAL_PARAMETER)
        assert (log.slave_calls, log.master_calls) == (1, 0)
        assert ledger_state(t.pair.server_keys.ledger) == (1, 1, 0)


async def test_server_refuses_a_replay_of_a_hello_it_answered_but_never_finished() -> None:
    async with target() as t:
        log = log_sources(t.pair.server_keys)
        hello = await capture(t.pair)
        answer = await exchange_first_message(t.port, hello)
        assert first_message(answer)[0] == HandshakeType.SERVER_HELLO
        await t.failures.wait_for(1)
        answer = await attack(t.port, hello)
        exc = await t.failures.wait_for(2)
        assert isinstance(exc, HandshakeError)
        assert exc.alert == Alert.ILLEGAL_PARAMETER
        assert answer == plaintext_alert(Alert.ILLEGAL_PARAMETER)
        assert log.slave_calls == 1
        assert ledger_state(t.pair.server_keys.ledger) == (1, 0, 1)


async def test_zero_key_id_makes_the_server_originate_the_key() -> None:
    async with target() as t:
        log = log_sources(t.pair.server_keys)
        client = t.pair.client(kems(QKD), QkdOptions(flow=Flow.SERVER_INITIATED))
        stream = await asyncio.wait_for(t.pair.handshake(client), IO_DEADLINE)
        assert stream.record.flow is Flow.SERVER_INITIATED
        await echo(stream)
        assert (log.master_calls, log.slave_calls) == (1, 0)
        assert stream.record.qkd_key_id is not None
        assert ledger_state(t.pair.server_keys.ledger) == (1, 1, 0)
        assert ledger_state(t.pair.client_keys.ledger) == (1, 1, 0)
        assert t.pair.link.keys_in_flight == 0


async def test_forged_zero_key_id_gets_a_fresh_server_key_that_is_then_wasted() -> None:
    async with target() as t:
        hello = await capture(t.pair)
        answer = await exchange_first_message(t.port, with_key_id(hello, ZERO_KEY_ID))
        share = parse_server_hello(first_message(answer)[4:]).key_exchange
        assert share is not None
        assert share[-KEY_ID_SIZE:] != ZERO_KEY_ID  # the server's own new key id
        exc = await server_error(t)
        assert exc.reason == "peer closed the connection during the handshake"
        assert ledger_state(t.pair.server_keys.ledger) == (1, 0, 1)
        # The client's genuine key and the server's new one both still wait at end "a".
        assert t.pair.link.keys_in_flight == 2


async def test_zero_key_id_without_a_master_source_is_refused() -> None:
    async with target() as t:
        sources = t.pair.server_keys.sources
        t.pair.server_keys.sources = KeySources(slave=sources.slave, stream=sources.stream)
        hello = await capture(t.pair)
        answer = await attack(t.port, with_key_id(hello, ZERO_KEY_ID))
        exc = await server_error(t)
        assert exc.alert == Alert.HANDSHAKE_FAILURE
        assert answer == plaintext_alert(Alert.HANDSHAKE_FAILURE)
        assert t.pair.server_keys.ledger.taken == 0


async def test_pipelined_second_hello_cannot_skip_the_key_exchange() -> None:
    """A hello forcing HelloRetryRequest with the second hello already behind it.

    The gate releases the second hello before the retry re-arms it, so the key exchange
    never sees it; the engine must refuse it (no secret was prepared for its share) and no
    key is spent.
    """
    async with target() as t:
        hello = await capture(t.pair)
        prefix, extensions = split_client_hello(first_message(hello)[4:])
        no_share = client_key_share_ext([])[4:]
        first = join_client_hello(
            prefix, [(k, no_share if k == EXT_KEY_SHARE else d) for k, d in extensions]
        )
        retry_hello = records(handshake_message(HandshakeType.CLIENT_HELLO, first))
        answer = await attack(t.port, retry_hello + CCS_RECORD + hello)
        exc = await server_error(t)
        assert exc.alert == Alert.ILLEGAL_PARAMETER
        # The HelloRetryRequest, the compatibility change_cipher_spec, the fatal alert.
        retry = split_first_message(answer)
        assert retry is not None
        assert parse_server_hello(first_message(retry)[4:]).hello_retry
        assert answer[len(retry) :] == CCS_RECORD + b"\x15\x03\x03\x00\x02\x02\x2f"
        assert t.pair.server_keys.ledger.taken == 0
        assert t.pair.link.keys_in_flight == 1


def intruder(pair: LoopbackPair) -> TlsEndpoint:
    """A client with a certificate from the right CA but an identity the server refuses."""
    client = pair.client(kems(QKD), QkdOptions())
    credentials = pair.ca.issue("client", [INTRUDER_URI], server=False)
    return TlsEndpoint(replace(client.settings, credentials=credentials))


async def test_server_refuses_a_client_identity_it_does_not_allow() -> None:
    async with target() as t:
        stream = await asyncio.wait_for(t.pair.handshake(intruder(t.pair)), IO_DEADLINE)
        exc = await server_error(t)
        assert exc.alert == Alert.ACCESS_DENIED
        assert INTRUDER_URI in exc.reason
        # TLS 1.3: the client finished first, so its side counts the key as consumed, and
        # learns of the refusal (the server's encrypted alert) only when it reads.
        with pytest.raises(TlsStreamError) as refused:
            await asyncio.wait_for(stream.read(), IO_DEADLINE)
        assert refused.value.alert == Alert.ACCESS_DENIED
        await stream.close()
        assert ledger_state(t.pair.server_keys.ledger) == (1, 0, 1)
        assert ledger_state(t.pair.client_keys.ledger) == (1, 1, 0)


async def test_refused_client_identity_gets_an_encrypted_alert() -> None:
    async with target() as t, RecordingRelay(t.port) as relay:
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        stream = await asyncio.wait_for(intruder(t.pair).connect(reader, writer), IO_DEADLINE)
        await server_error(t)
        with contextlib.suppress(TlsStreamError):
            await asyncio.wait_for(stream.read(), IO_DEADLINE)
        await stream.close()
        await settle()
        sent = record_headers(bytes(relay.server_bytes))
        # ServerHello, ChangeCipherSpec, the encrypted flight, then the alert: one
        # application_data record of 2 alert bytes + 1 content type + 16 tag bytes.
        assert sent[:2] == [(22, sent[0][1]), (20, 1)]
        assert sent[3:] == [(23, 19)]


def record_headers(data: bytes) -> list[tuple[int, int]]:
    """(content type, length) of every complete record in ``data``."""
    headers, pos = [], 0
    while pos + 5 <= len(data):
        length = int.from_bytes(data[pos + 3 : pos + 5], "big")
        headers.append((data[pos], length))
        pos += 5 + length
    return headers


async def test_duplicate_extension_is_refused_without_a_key() -> None:
    async with target() as t:
        hello = await capture(t.pair)
        prefix, extensions = split_client_hello(first_message(hello)[4:])
        doubled = join_client_hello(prefix, [*extensions, extensions[0]])
        answer = await attack(
            t.port, records(handshake_message(HandshakeType.CLIENT_HELLO, doubled))
        )
        await server_error(t)
        assert_alert_or_close(answer)
        assert t.pair.server_keys.ledger.taken == 0


@pytest.mark.parametrize("ext_type", [EXT_KEY_SHARE, EXT_SUPPORTED_VERSIONS])
async def test_a_duplicated_extension_tlslite_looks_up_is_an_illegal_parameter(
    ext_type: int, caplog: pytest.LogCaptureFixture
) -> None:
    """tlslite raises TLSInternalError when it looks up an extension the client sent twice:
    an unauthenticated client would get internal_error and the server log a traceback."""
    async with target() as t:
        hello = await capture(t.pair)
        prefix, extensions = split_client_hello(first_message(hello)[4:])
        [data] = [d for typ, d in extensions if typ == ext_type]
        doubled = join_client_hello(prefix, [*extensions, (ext_type, data)])
        answer = await attack(
            t.port, records(handshake_message(HandshakeType.CLIENT_HELLO, doubled))
        )
        exc = await server_error(t)
        assert answer == plaintext_alert(Alert.ILLEGAL_PARAMETER)
        assert exc.alert == Alert.ILLEGAL_PARAMETER
        assert "internal error" not in caplog.text
        assert t.pair.server_keys.ledger.taken == 0


async def test_server_sends_the_alert_tlslite_raised() -> None:
    """A framed but malformed hello: tlslite's own decode_error must reach the peer."""
    async with target() as t:
        payload = records(handshake_message(HandshakeType.CLIENT_HELLO, b"\x03\x03"))
        answer = await attack(t.port, payload)
        exc = await server_error(t)
        assert exc.alert == Alert.DECODE_ERROR
        assert answer == plaintext_alert(Alert.DECODE_ERROR)


@pytest.mark.parametrize("how", ["abort", "corrupt-record"])
async def test_client_misbehaving_after_the_handshake_does_not_crash_the_server(
    quiet_loop: LoopErrors, how: str
) -> None:
    async with target() as t:
        client = t.pair.client(kems(QKD), QkdOptions())
        reader, writer = await asyncio.open_connection("127.0.0.1", t.port)
        stream = await asyncio.wait_for(client.connect(reader, writer), IO_DEADLINE)
        await stream.write(b"ping")
        assert await asyncio.wait_for(stream.read(), IO_DEADLINE) == b"ping"
        if how == "abort":
            writer.transport.abort()  # a bare TCP close: no close_notify
        else:
            writer.write(b"\x17\x03\x03\x00\x20" + bytes(32))  # fails authentication
            await writer.drain()
        await settle()  # the server's connection handler has ended
        with contextlib.suppress(TlsStreamError):
            await stream.close()
    await settle()
    seen = [str(context.get("exception") or context["message"]) for context in quiet_loop]
    quiet_loop.clear()
    assert seen == []


# --------------------------------------------------------- never a key used twice


async def test_no_key_is_used_twice_across_good_and_bad_handshakes() -> None:
    # The server does not support PQ: a client leading with a PQ share gets a retry.
    async with target((QKD, CLASSICAL)) as t:
        pair = t.pair
        server_log = log_sources(pair.server_keys)
        client_log = log_sources(pair.client_keys)
        used: list[str] = []

        async def good(names: tuple[str, ...], flow: Flow = Flow.CLIENT_INITIATED) -> bool:
            """A complete handshake and echo; True if it went through HelloRetryRequest."""
            client = pair.client(kems(*names), QkdOptions(flow=flow))
            stream = await asyncio.wait_for(pair.handshake(client), IO_DEADLINE)
            if stream.record.qkd_key_id is not None:
                used.append(stream.record.qkd_key_id)
            await echo(stream)
            return stream.record.hello_retry

        failures = 0

        async def bad(payload: bytes, *, eof: bool = False) -> None:
            nonlocal failures
            answer = await attack(t.port, payload, eof=eof)
            failures += 1
            await t.failures.wait_for(failures)
            assert_alert_or_close(answer)

        await good((QKD,))
        replayable = await capture(pair)  # client key wasted, server key waiting
        await good((QKD,), Flow.SERVER_INITIATED)
        await bad(with_key_id(replayable, os.urandom(KEY_ID_SIZE)))
        assert await good((PQ, QKD))  # HelloRetryRequest to QKD, the key taken on retry
        await bad(replayable[:100], eof=True)
        first_answer = await exchange_first_message(t.port, replayable)  # key fetched, wasted
        assert first_message(first_answer)[0] == HandshakeType.SERVER_HELLO
        failures += 1
        await t.failures.wait_for(failures)
        await bad(replayable)  # replay: refused by the guard
        await good((CLASSICAL,))  # no QKD key at all
        await good((QKD,))
        await bad(with_key_id(replayable, ZERO_KEY_ID)[:-1], eof=True)
        await settle()

        assert all(isinstance(f, HandshakeError) for f in t.failures)
        assert len(used) == len(set(used)) == 4
        for log in (server_log, client_log):
            assert len(log.key_ids) == len(set(log.key_ids))
        # One key, two ends: each end holds the key ids the other end's master originated.
        assert set(server_log.fetched) == set(client_log.taken)
        assert set(client_log.fetched) == set(server_log.taken)
        as_text = {str(uuid.UUID(bytes=k)) for k in server_log.key_ids}
        assert set(used) <= as_text
        assert len(server_log.fetched) == 4  # three client-initiated + the forged replay
        assert len(server_log.taken) == 1
        server, client = pair.server_keys.ledger, pair.client_keys.ledger
        assert_settled(server)
        assert_settled(client)
        assert ledger_state(server) == (5, 4, 1)
        assert ledger_state(client) == (5, 4, 1)
        assert pair.link.keys_in_flight == 0


# ------------------------------------------------------- client: malicious servers


@dataclass(frozen=True, slots=True)
class Reply:
    """What the malicious server does once it has read the ClientHello."""

    make: Callable[[bytes], bytes] | None  # None: hang up at once
    hang_up: bool = True  # False: wait for the client to give up


def forged_server_hello(hello_records: bytes, key_id: bytes | None) -> bytes:
    """A plausible ServerHello for the captured hello: random ciphertext, chosen key id."""
    body = first_message(hello_records)[4:]
    session_id = body[35 : 35 + body[34]]
    share = client_share(hello_records)
    group = parse_client_hello(body).key_shares[0].group
    echoed = share[-KEY_ID_SIZE:] if key_id is None else key_id
    ciphertext = os.urandom(hybrid(QKD).ciphertext_size) + echoed
    extensions = [
        ext(EXT_SUPPORTED_VERSIONS, b"\x03\x04"),
        ext(EXT_KEY_SHARE, u16(group) + u16(len(ciphertext)) + ciphertext),
    ]
    return records(
        handshake_message(
            HandshakeType.SERVER_HELLO,
            server_hello_body(extensions, random=os.urandom(32), session_id=session_id),
        )
    )


@asynccontextmanager
async def malicious_server(reply: Reply) -> AsyncIterator[tuple[int, list[bytes]]]:
    """Yield (port, what each client sent after our reply)."""
    heard: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            hello = await read_first_message(reader)
            if reply.make is not None:
                writer.write(reply.make(hello))
                await writer.drain()
                if not reply.hang_up:
                    heard.append(await reader.read())
        except ConnectionError:
            pass
        finally:
            await close_writer(writer)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], heard
    finally:
        server.close()
        await server.wait_closed()


def server_hello_with_empty_share(hello_records: bytes) -> bytes:
    """A ServerHello whose key_share extension is empty (tlslite used to crash on it)."""
    body = first_message(hello_records)[4:]
    session_id = body[35 : 35 + body[34]]
    extensions = [ext(EXT_SUPPORTED_VERSIONS, b"\x03\x04"), ext(EXT_KEY_SHARE, b"")]
    return records(
        handshake_message(
            HandshakeType.SERVER_HELLO,
            server_hello_body(extensions, random=os.urandom(32), session_id=session_id),
        )
    )


CLIENT_CASES = {
    "garbage-http": Reply(lambda _: b"HTTP/1.1 400 Bad Request\r\n\r\n"),
    "garbage-random": Reply(lambda _: os.urandom(200)),
    "garbage-silent": Reply(lambda _: b"\x16\x03\x03\x01\x00", hang_up=False),
    "alert": Reply(lambda _: plaintext_alert(Alert.HANDSHAKE_FAILURE)),
    "close": Reply(None),
    "nothing": Reply(lambda _: b"", hang_up=False),
    "wrong-key-id": Reply(lambda h: forged_server_hello(h, os.urandom(KEY_ID_SIZE)), False),
    "echoed-key-id-then-close": Reply(lambda h: forged_server_hello(h, None)),
    "empty-key-share": Reply(server_hello_with_empty_share, False),
}


@pytest.mark.parametrize("case", list(CLIENT_CASES))
async def test_client_against_malicious_server(case: str) -> None:
    async with (
        loopback_pair(kems(QKD)) as pair,
        malicious_server(CLIENT_CASES[case]) as (
            port,
            heard,
        ),
    ):
        log = log_sources(pair.client_keys)
        client = pair.client(kems(QKD), QkdOptions())
        client = TlsEndpoint(replace(client.settings, handshake_timeout=SHORT_TIMEOUT))
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        with pytest.raises(HandshakeError) as info:
            await asyncio.wait_for(client.connect(reader, writer), IO_DEADLINE)
        await settle()
        exc = info.value
        if case == "alert":
            assert (exc.alert, exc.remote) == (Alert.HANDSHAKE_FAILURE, True)
        if case == "close":
            assert exc.remote
        if case in ("nothing", "garbage-silent"):
            assert exc.reason == "handshake timed out"
        if case == "wrong-key-id":
            assert exc.alert == Alert.ILLEGAL_PARAMETER
            assert exc.reason == "server did not echo the QKD key id"
            assert heard == [plaintext_alert(Alert.ILLEGAL_PARAMETER)]
        if case == "empty-key-share":
            assert exc.alert == Alert.DECODE_ERROR
            assert heard == [plaintext_alert(Alert.DECODE_ERROR)]
        ledger = pair.client_keys.ledger
        assert ledger.outstanding == 0
        assert ledger_state(ledger) == (1, 0, 1)
        assert ledger.wasted_by_reason == {"handshake_failed": 1}
        assert len(log.taken) == 1


@pytest.mark.parametrize(
    ("key_id", "reason"),
    [
        pytest.param(ZERO_KEY_ID, "server sent no QKD key id", id="zero"),
        pytest.param(
            b"\x42" * KEY_ID_SIZE,
            "ETSI 014 dec_keys: key id unknown, already used, or not for this end",
            id="unknown",
        ),
    ],
)
async def test_server_initiated_client_refuses_bad_key_id(key_id: bytes, reason: str) -> None:
    async with (
        loopback_pair(kems(QKD)) as pair,
        malicious_server(Reply(lambda h: forged_server_hello(h, key_id), hang_up=False)) as (
            port,
            heard,
        ),
    ):
        client = pair.client(kems(QKD), QkdOptions(flow=Flow.SERVER_INITIATED))
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        with pytest.raises(HandshakeError) as info:
            await asyncio.wait_for(client.connect(reader, writer), IO_DEADLINE)
        await settle()
        assert (info.value.alert, info.value.reason) == (Alert.ILLEGAL_PARAMETER, reason)
        assert heard == [plaintext_alert(Alert.ILLEGAL_PARAMETER)]
        assert ledger_state(pair.client_keys.ledger) == (0, 0, 0)


async def test_client_sends_the_alert_tlslite_raised() -> None:
    malformed = records(handshake_message(HandshakeType.SERVER_HELLO, b"\x03\x03"))
    async with (
        loopback_pair(kems(QKD)) as pair,
        malicious_server(Reply(lambda _: malformed, hang_up=False)) as (port, heard),
    ):
        client = pair.client(kems(QKD), QkdOptions())
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        with pytest.raises(HandshakeError) as info:
            await asyncio.wait_for(client.connect(reader, writer), IO_DEADLINE)
        await settle()
        assert info.value.alert == Alert.DECODE_ERROR
        [alert] = heard
        # Before the ServerHello is accepted tlslite may still use record version 3.1.
        assert alert in (plaintext_alert(Alert.DECODE_ERROR), b"\x15\x03\x01" + alert[3:])
        assert alert[3:] == b"\x00\x02\x02" + bytes([Alert.DECODE_ERROR])
