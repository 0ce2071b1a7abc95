"""HelloGate and the hello parsers, fed with hellos captured from a real qkdproxy client.

The tests are pure (no sockets); only the module fixture talks to a real client and server,
once, to capture genuine ClientHello / ServerHello bytes. The capture helpers below are also
used by ``tests/integration/test_hostile.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qkdproxy.core.hybrid import KEY_ID_SIZE, HybridKem
from qkdproxy.core.tls.hello import (
    EXT_KEY_SHARE,
    EXT_SUPPORTED_GROUPS,
    HELLO_RETRY_RANDOM,
    ClientHello,
    HelloParseError,
    KeyShareEntry,
    ServerHello,
    parse_client_hello,
    parse_server_hello,
)
from qkdproxy.core.tls.keyexchange import QkdOptions
from qkdproxy.core.tls.wire import (
    MAX_HELLO_SIZE,
    MAX_PLAINTEXT_RECORD,
    ContentType,
    GateEvent,
    HandshakeType,
    HeldHello,
    HelloGate,
    Release,
)
from qkdproxy.io.tls_stream import HandshakeError, TlsEndpoint
from qkdproxy.tools.loopback import SERVER_NAME, loopback_pair, resolve_groups

CCS_RECORD = bytes([ContentType.CHANGE_CIPHER_SPEC, 3, 3, 0, 1, 1])
EXT_SERVER_NAME = 0
EXT_SUPPORTED_VERSIONS = 43
EXT_PADDING = 21
TLS13_SUITES = {0x1301, 0x1302, 0x1303}
QKD_MLKEM768 = 0x3768
X25519MLKEM768 = 0x11EC
IO_DEADLINE = 10.0

# ----------------------------------------------------------------------------- wire helpers


def u16(value: int) -> bytes:
    return value.to_bytes(2, "big")


def vec(length_size: int, data: bytes) -> bytes:
    """A TLS vector: big-endian length of ``length_size`` bytes, then the data."""
    return len(data).to_bytes(length_size, "big") + data


def ext(ext_type: int, data: bytes) -> bytes:
    return u16(ext_type) + vec(2, data)


def supported_groups_ext(codes: list[int]) -> bytes:
    return ext(EXT_SUPPORTED_GROUPS, vec(2, b"".join(u16(c) for c in codes)))


def client_key_share_ext(entries: list[tuple[int, bytes]]) -> bytes:
    return ext(EXT_KEY_SHARE, vec(2, b"".join(u16(g) + vec(2, ke) for g, ke in entries)))


def server_name_ext(name: bytes) -> bytes:
    return ext(EXT_SERVER_NAME, vec(2, b"\x00" + vec(2, name)))


def supported_versions_ext(versions: list[int]) -> bytes:
    return ext(EXT_SUPPORTED_VERSIONS, vec(1, b"".join(u16(v) for v in versions)))


def client_hello_body(
    extensions: list[bytes] | None,
    session_id: bytes = bytes(32),
    random: bytes = bytes(range(32)),
    suites: bytes = b"\x13\x01\x13\x02",
) -> bytes:
    """A ClientHello body; ``extensions=None`` omits the extensions block altogether."""
    body = b"\x03\x03" + random + vec(1, session_id) + vec(2, suites) + vec(1, b"\0")
    return body if extensions is None else body + vec(2, b"".join(extensions))


def server_hello_body(
    extensions: list[bytes], random: bytes = bytes(32), session_id: bytes = bytes(32)
) -> bytes:
    return (
        b"\x03\x03"
        + random
        + vec(1, session_id)
        + b"\x13\x01"
        + b"\x00"
        + vec(2, b"".join(extensions))
    )


def hello_retry_body(*extensions: bytes) -> bytes:
    return server_hello_body(
        [ext(EXT_SUPPORTED_VERSIONS, b"\x03\x04"), *extensions], random=HELLO_RETRY_RANDOM
    )


def handshake_message(msg_type: int, body: bytes) -> bytes:
    return bytes([msg_type]) + len(body).to_bytes(3, "big") + body


def records(payload: bytes, sizes: list[int] | None = None, content_type: int = 22) -> bytes:
    """``payload`` cut into plaintext records of the given sizes (the last one takes the rest)."""
    out, pos = bytearray(), 0
    for size in [*(sizes or []), len(payload)]:
        if pos >= len(payload):
            break
        fragment = payload[pos : pos + size]
        out += bytes([content_type, 3, 3]) + vec(2, fragment)
        pos += len(fragment)
    return bytes(out)


def split_first_message(buf: bytes) -> bytes | None:
    """The leading records of ``buf`` that carry its first handshake message (None: incomplete)."""
    pos, message = 0, bytearray()
    while len(buf) >= pos + 5:
        end = pos + 5 + int.from_bytes(buf[pos + 3 : pos + 5], "big")
        if len(buf) < end:
            return None
        if buf[pos] == ContentType.HANDSHAKE:
            message += buf[pos + 5 : end]
        pos = end
        if len(message) >= 4 and len(message) >= 4 + int.from_bytes(message[1:4], "big"):
            return buf[:pos]
    return None


def first_message(record_bytes: bytes) -> bytes:
    """The first handshake message carried by ``record_bytes`` (header included)."""
    message, pos = bytearray(), 0
    while pos < len(record_bytes):
        end = pos + 5 + int.from_bytes(record_bytes[pos + 3 : pos + 5], "big")
        if record_bytes[pos] == ContentType.HANDSHAKE:
            message += record_bytes[pos + 5 : end]
        pos = end
    return bytes(message[: 4 + int.from_bytes(message[1:4], "big")])


def extensions_offset(body: bytes) -> int:
    """Where the extensions block of a ClientHello body starts."""
    pos = 2 + 32
    pos += 1 + body[pos]
    pos += 2 + int.from_bytes(body[pos : pos + 2], "big")
    return pos + 1 + body[pos]


def split_client_hello(body: bytes) -> tuple[bytes, list[tuple[int, bytes]]]:
    """A ClientHello body as (everything before the extensions, [(type, data), ...])."""
    start = extensions_offset(body)
    block, pos, found = body[start + 2 :], 0, []
    while pos < len(block):
        ext_type = int.from_bytes(block[pos : pos + 2], "big")
        length = int.from_bytes(block[pos + 2 : pos + 4], "big")
        found.append((ext_type, block[pos + 4 : pos + 4 + length]))
        pos += 4 + length
    return body[:start], found


def join_client_hello(prefix: bytes, extensions: list[tuple[int, bytes]]) -> bytes:
    return prefix + vec(2, b"".join(ext(t, d) for t, d in extensions))


# ------------------------------------------------------------------- capturing real hellos


class FailureLog(list[BaseException]):
    """A list for ``loopback_pair(server_failures=...)`` that can be awaited."""

    def __init__(self) -> None:
        super().__init__()
        self._changed = asyncio.Event()

    def append(self, item: BaseException, /) -> None:
        super().append(item)
        self._changed.set()

    async def wait_for(self, count: int = 1, deadline: float = IO_DEADLINE) -> BaseException:
        """Wait until ``count`` failures were logged; return the last one."""
        async with asyncio.timeout(deadline):
            while len(self) < count:
                self._changed.clear()
                await self._changed.wait()
        return self[count - 1]


async def settle(deadline: float = IO_DEADLINE) -> None:
    """Wait until every other task on the loop (server handlers, relays) has finished."""
    async with asyncio.timeout(deadline):
        while others := asyncio.all_tasks() - {asyncio.current_task()}:
            await asyncio.wait(others)


async def read_first_message(reader: asyncio.StreamReader) -> bytes:
    """Read until the first handshake message is complete; return the records carrying it."""
    buf = b""
    while (found := split_first_message(buf)) is None:
        data = await reader.read(65536)
        if not data:
            raise EOFError(f"peer closed after {len(buf)} bytes")
        buf += data
    return found


async def close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def send_raw(
    port: int,
    payload: bytes,
    receive: Callable[[asyncio.StreamReader], Awaitable[bytes]],
    *,
    eof: bool = False,
) -> bytes:
    """Connect, send ``payload`` (then EOF if asked), return what ``receive`` reads."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        await writer.drain()
        if eof:
            writer.write_eof()
        return await asyncio.wait_for(receive(reader), IO_DEADLINE)
    finally:
        await close_writer(writer)


async def exchange(port: int, payload: bytes, *, eof: bool = False) -> bytes:
    """Send raw bytes; return the records of the server's first answer."""
    return await send_raw(port, payload, read_first_message, eof=eof)


async def capture_client_hello(client: TlsEndpoint) -> bytes:
    """The records carrying the ClientHello ``client`` sends (its handshake then fails).

    A recorder on 127.0.0.1 reads the hello and hangs up, so the client's handshake ends
    with a HandshakeError; a QKD key the client took for the hello is wasted at its end but
    still waiting at the peer end of the link, ready for the server to fetch.
    """
    captured: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            captured.set_result(await read_first_message(reader))
        except Exception as exc:
            captured.set_exception(exc)
        finally:
            await close_writer(writer)

    recorder = await asyncio.start_server(record, "127.0.0.1", 0)
    try:
        port = recorder.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            await asyncio.wait_for(client.connect(reader, writer), IO_DEADLINE)
        except HandshakeError:
            pass
        else:
            raise AssertionError("the client completed a handshake with the recorder")
        return await asyncio.wait_for(captured, IO_DEADLINE)
    finally:
        recorder.close()
        await recorder.wait_closed()


@dataclass(frozen=True, slots=True)
class Captured:
    """A real ClientHello (and the real server's first answer to it)."""

    offered: tuple[HybridKem, ...]
    client_records: bytes
    server_records: bytes

    @property
    def client_message(self) -> bytes:
        return first_message(self.client_records)

    @property
    def client_body(self) -> bytes:
        return self.client_message[4:]

    @property
    def server_body(self) -> bytes:
        return first_message(self.server_records)[4:]


async def _capture(names: tuple[str, ...]) -> Captured:
    offered = tuple(resolve_groups(names))
    failures = FailureLog()
    async with loopback_pair(offered, server_failures=failures) as pair:
        client = pair.client(offered, QkdOptions())
        hello = await capture_client_hello(client)
        answer = await exchange(pair.port, hello)
        await failures.wait_for()  # the server saw us hang up after its ServerHello
        await settle()
    return Captured(offered, hello, answer)


CAPTURE_CASES = {
    "qkd": ("qkd_mlkem768", "X25519MLKEM768"),
    "pq": ("X25519MLKEM768",),
    "triple": ("qkd_x25519mlkem768", "qkd_mlkem768"),
}


@pytest.fixture(scope="module")
def captured() -> Iterator[dict[str, Captured]]:
    with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
        yield {key: runner.run(_capture(names)) for key, names in CAPTURE_CASES.items()}


def feed_all(gate: HelloGate, chunks: list[bytes]) -> list[GateEvent]:
    events: list[GateEvent] = []
    for chunk in chunks:
        events.extend(gate.feed(chunk))
    return events


def stream_of(events: list[GateEvent]) -> bytes:
    """The bytes the TLS engine ends up seeing, in order."""
    return b"".join(e.data if isinstance(e, Release) else e.records for e in events)


def held(events: list[GateEvent]) -> list[HeldHello]:
    return [e for e in events if isinstance(e, HeldHello)]


def cut(data: bytes, points: list[int]) -> list[bytes]:
    bounds = [0, *sorted({p % (len(data) + 1) for p in points}), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


SETTINGS = settings(
    max_examples=75, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

# ---------------------------------------------------------------------------- HelloGate


@SETTINGS
@given(points=st.lists(st.integers(min_value=0), max_size=30), trailing=st.binary(max_size=300))
def test_gate_any_chunking_yields_one_hello_and_the_same_stream(
    captured: dict[str, Captured], points: list[int], trailing: bytes
) -> None:
    hello = captured["qkd"].client_records
    data = hello + trailing
    gate = HelloGate(HandshakeType.CLIENT_HELLO)
    events = feed_all(gate, cut(data, points))
    assert stream_of(events) == data
    [message] = held(events)
    assert message.message == captured["qkd"].client_message
    assert message.records == hello
    assert message.msg_type == HandshakeType.CLIENT_HELLO
    assert message.body == captured["qkd"].client_body
    assert gate.passthrough


@SETTINGS
@given(
    sizes=st.lists(st.integers(min_value=1, max_value=700), min_size=1, max_size=12),
    points=st.lists(st.integers(min_value=0), max_size=10),
)
def test_gate_reassembles_a_hello_fragmented_over_records(
    captured: dict[str, Captured], sizes: list[int], points: list[int]
) -> None:
    message = captured["qkd"].client_message
    data = records(message, sizes)
    events = feed_all(HelloGate(HandshakeType.CLIENT_HELLO), cut(data, points))
    [hello] = held(events)
    assert hello.message == message
    assert hello.records == data
    assert stream_of(events) == data
    assert parse_client_hello(hello.body) == parse_client_hello(captured["qkd"].client_body)


def test_gate_holds_nothing_until_the_last_fragment(captured: dict[str, Captured]) -> None:
    message = captured["qkd"].client_message
    gate = HelloGate(HandshakeType.CLIENT_HELLO)
    fragments = [records(message[i : i + 100]) for i in range(0, len(message), 100)]
    for fragment in fragments[:-1]:
        assert gate.feed(fragment) == []
        assert not gate.passthrough
    [hello] = gate.feed(fragments[-1])
    assert isinstance(hello, HeldHello)
    assert hello.records == b"".join(fragments)


def test_gate_accepts_a_record_of_exactly_the_maximum_size() -> None:
    body = client_hello_body([ext(EXT_PADDING, bytes(20000))])
    message = handshake_message(HandshakeType.CLIENT_HELLO, body)
    data = records(message, [MAX_PLAINTEXT_RECORD])
    assert int.from_bytes(data[3:5], "big") == MAX_PLAINTEXT_RECORD
    [hello] = HelloGate(HandshakeType.CLIENT_HELLO).feed(data)
    assert isinstance(hello, HeldHello)
    assert hello.message == message


def test_gate_releases_change_cipher_spec_before_the_hello_at_once(
    captured: dict[str, Captured],
) -> None:
    gate = HelloGate(HandshakeType.CLIENT_HELLO)
    assert gate.feed(CCS_RECORD[:3]) == []
    assert gate.feed(CCS_RECORD[3:]) == [Release(CCS_RECORD)]
    assert not gate.passthrough
    hello = captured["qkd"].client_records
    events = gate.feed(CCS_RECORD + hello)
    assert events == [Release(CCS_RECORD), HeldHello(captured["qkd"].client_message, hello)]


def test_gate_gives_up_on_change_cipher_spec_between_fragments(
    captured: dict[str, Captured],
) -> None:
    message = captured["qkd"].client_message
    data = records(message[:300]) + CCS_RECORD + records(message[300:])
    gate = HelloGate(HandshakeType.CLIENT_HELLO)
    events = gate.feed(data)
    assert held(events) == []
    assert stream_of(events) == data
    assert gate.passthrough


def test_gate_is_passthrough_after_the_allowed_hello(captured: dict[str, Captured]) -> None:
    hello = captured["qkd"].client_records
    gate = HelloGate(HandshakeType.CLIENT_HELLO)
    assert not gate.passthrough
    assert len(held(gate.feed(hello))) == 1
    assert gate.passthrough
    for data in (hello, CCS_RECORD, b"\x17\x03\x03\x00\x01x", b"\x16"):
        assert gate.feed(data) == [Release(data)]


def test_gate_allow_another_admits_a_second_hello(captured: dict[str, Captured]) -> None:
    hello = captured["qkd"].client_records
    gate = HelloGate(HandshakeType.CLIENT_HELLO)
    [first] = gate.feed(hello)
    assert isinstance(first, HeldHello)
    gate.allow_another()
    assert not gate.passthrough
    events = gate.feed(CCS_RECORD + hello)
    assert events == [Release(CCS_RECORD), first]
    assert gate.passthrough
    assert gate.feed(hello) == [Release(hello)]


def test_gate_allow_another_before_the_first_hello_admits_two(
    captured: dict[str, Captured],
) -> None:
    hello = captured["qkd"].client_records
    gate = HelloGate(HandshakeType.CLIENT_HELLO)
    gate.allow_another()
    events = gate.feed(hello + hello + hello)
    assert [type(e) for e in events] == [HeldHello, HeldHello, Release]
    assert stream_of(events) == hello * 3


def test_gate_allow_another_after_giving_up_changes_nothing() -> None:
    gate = HelloGate(HandshakeType.CLIENT_HELLO)
    junk = b"\x17\x03\x03\x00\x02ab"
    assert gate.feed(junk) == [Release(junk)]
    gate.allow_another()
    assert gate.passthrough
    hello = records(handshake_message(HandshakeType.CLIENT_HELLO, client_hello_body([])))
    assert gate.feed(hello) == [Release(hello)]


@pytest.mark.parametrize(
    "first",
    [
        pytest.param(b"\x17\x03\x03\x00\x05hello", id="application_data"),
        pytest.param(b"\x15\x03\x03\x00\x02\x02\x28", id="alert"),
        pytest.param(b"\x00\x03\x03\x00\x01\x00", id="type-0"),
        pytest.param(b"\xff\x03\x03\x00\x00", id="type-255"),
        pytest.param(b"\x16\x03\x03" + u16(MAX_PLAINTEXT_RECORD + 1), id="oversized-by-1"),
        pytest.param(b"\x16\x03\x01" + u16(2**14 + 1000), id="oversized-by-1000"),
        pytest.param(b"\x14\x03\x03\xff\xff", id="oversized-ccs"),
    ],
)
def test_gate_passes_everything_through_after_a_record_it_does_not_hold(
    captured: dict[str, Captured], first: bytes
) -> None:
    gate = HelloGate(HandshakeType.CLIENT_HELLO)
    # Decided on the 5-byte header alone: nothing waits for a body that may never come.
    assert gate.feed(first[:5]) == [Release(first[:5])]
    assert gate.passthrough
    rest = first[5:] + captured["qkd"].client_records
    assert gate.feed(rest) == [Release(rest)]


@SETTINGS
@given(
    content_type=st.integers(0, 255).filter(lambda t: t not in (20, 22)),
    tail=st.binary(max_size=50),
)
def test_gate_any_unknown_content_type_is_passed_through_unchanged(
    captured: dict[str, Captured], content_type: int, tail: bytes
) -> None:
    data = bytes([content_type, 3, 3]) + vec(2, tail) + captured["qkd"].client_records
    gate = HelloGate(HandshakeType.CLIENT_HELLO)
    events = gate.feed(data)
    assert events == [Release(data)]
    assert gate.passthrough


def test_gate_waits_for_a_full_record_header() -> None:
    gate = HelloGate(HandshakeType.CLIENT_HELLO)
    for byte in b"\x17\x03\x03\x00":
        assert gate.feed(bytes([byte])) == []
    assert gate.feed(b"\x01") == [Release(b"\x17\x03\x03\x00\x01")]


def test_gate_passes_a_handshake_message_of_the_wrong_type_through(
    captured: dict[str, Captured],
) -> None:
    server_hello = captured["qkd"].server_records
    gate = HelloGate(HandshakeType.CLIENT_HELLO)
    assert gate.feed(server_hello) == [Release(server_hello)]
    assert gate.passthrough
    client_hello = captured["qkd"].client_records
    assert gate.feed(client_hello) == [Release(client_hello)]

    gate = HelloGate(HandshakeType.SERVER_HELLO)
    assert gate.feed(client_hello) == [Release(client_hello)]
    assert gate.passthrough


def test_gate_judges_the_type_on_the_first_fragment(captured: dict[str, Captured]) -> None:
    message = first_message(captured["qkd"].server_records)
    fragments = records(message, [4, 100])
    first_record = fragments[:9]
    gate = HelloGate(HandshakeType.CLIENT_HELLO)
    assert gate.feed(first_record) == [Release(first_record)]
    assert gate.passthrough


def test_gate_gives_up_on_an_empty_handshake_record(captured: dict[str, Captured]) -> None:
    """Empty handshake records are illegal; holding them would let a peer grow the buffer."""
    empty = b"\x16\x03\x03\x00\x00"
    gate = HelloGate(HandshakeType.CLIENT_HELLO)
    data = empty * 1000 + captured["qkd"].client_records
    events = gate.feed(data)
    assert events == [Release(data)]
    assert gate.passthrough


def test_gate_bounds_what_it_holds_for_one_hello() -> None:
    """A maximal hello announced, then sent one byte per record: the gate must give up."""
    header = bytes([HandshakeType.CLIENT_HELLO]) + MAX_HELLO_SIZE.to_bytes(3, "big")
    one_byte_records = records(header + bytes(MAX_HELLO_SIZE), [1] * (MAX_HELLO_SIZE + 4))
    gate = HelloGate(HandshakeType.CLIENT_HELLO)
    events = feed_all(
        gate, [one_byte_records[i : i + 6000] for i in range(0, len(one_byte_records), 6000)]
    )
    assert held(events) == []
    assert gate.passthrough
    assert stream_of(events) == one_byte_records


def test_gate_gives_up_on_a_hello_claiming_more_than_the_maximum() -> None:
    header = bytes([HandshakeType.CLIENT_HELLO]) + (MAX_HELLO_SIZE + 1).to_bytes(3, "big")
    data = records(header + bytes(100))
    gate = HelloGate(HandshakeType.CLIENT_HELLO)
    assert gate.feed(data) == [Release(data)]
    assert gate.passthrough


def test_gate_holds_hello_retry_request_then_server_hello(captured: dict[str, Captured]) -> None:
    hrr = records(
        handshake_message(
            HandshakeType.SERVER_HELLO, hello_retry_body(ext(EXT_KEY_SHARE, u16(QKD_MLKEM768)))
        )
    )
    server_hello = captured["qkd"].server_records
    encrypted = b"\x17\x03\x03\x00\x04abcd"
    gate = HelloGate(HandshakeType.SERVER_HELLO)
    events = gate.feed(hrr + CCS_RECORD)
    assert [type(e) for e in events] == [HeldHello, Release]
    gate.allow_another()
    events = gate.feed(server_hello + encrypted)
    assert [type(e) for e in events] == [HeldHello, Release]
    assert stream_of(events) == server_hello + encrypted


# ------------------------------------------------------------------------------ parsers


@pytest.mark.parametrize(
    ("case", "share_size"), [("qkd", 1200), ("pq", 1216), ("triple", 1184 + 32 + 16)]
)
def test_real_client_hello_parses(
    captured: dict[str, Captured], case: str, share_size: int
) -> None:
    capture = captured[case]
    hello = parse_client_hello(capture.client_body)
    assert hello.supported_groups == tuple(g.group.code_point for g in capture.offered)
    [share] = hello.key_shares
    first = capture.offered[0]
    assert share.group == first.group.code_point
    assert len(share.key_exchange) == share_size == first.client_share_size
    assert hello.share_for(first.group.code_point) == share
    for other in capture.offered[1:]:
        assert hello.share_for(other.group.code_point) is None
    assert hello.offers_tls13
    assert TLS13_SUITES & set(hello.cipher_suites)
    # The client named the server (SNI), an extension the parser skips.
    assert SERVER_NAME.encode() in capture.client_body


def test_real_server_hello_parses_and_echoes_the_key_id(captured: dict[str, Captured]) -> None:
    capture = captured["qkd"]
    answer = parse_server_hello(capture.server_body)
    assert answer.hello_retry is False
    assert answer.group == QKD_MLKEM768
    assert answer.key_exchange is not None
    assert len(answer.key_exchange) == 1088 + KEY_ID_SIZE == capture.offered[0].server_share_size
    client_share = parse_client_hello(capture.client_body).key_shares[0].key_exchange
    assert answer.key_exchange[-KEY_ID_SIZE:] == client_share[-KEY_ID_SIZE:]


def test_every_truncation_of_a_real_client_hello_is_refused(
    captured: dict[str, Captured],
) -> None:
    body = captured["qkd"].client_body
    no_extensions = extensions_offset(body)
    for size in range(len(body)):
        if size == no_extensions:
            # Exactly the legacy (TLS 1.2 syntax) hello without an extensions block: valid
            # syntax, but it offers nothing the key exchange could use.
            legacy = parse_client_hello(body[:size])
            assert (legacy.supported_groups, legacy.key_shares) == ((), ())
            assert not legacy.offers_tls13
            continue
        with pytest.raises(HelloParseError):
            parse_client_hello(body[:size])


def test_every_truncation_of_a_real_server_hello_is_refused(
    captured: dict[str, Captured],
) -> None:
    body = captured["qkd"].server_body
    for size in range(len(body)):
        with pytest.raises(HelloParseError):
            parse_server_hello(body[:size])


def test_trailing_bytes_are_refused(captured: dict[str, Captured]) -> None:
    with pytest.raises(HelloParseError, match="trailing"):
        parse_client_hello(captured["qkd"].client_body + b"\0")
    with pytest.raises(HelloParseError, match="trailing"):
        parse_server_hello(captured["qkd"].server_body + b"\0")


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=600))
def test_random_bytes_raise_only_hello_parse_error(data: bytes) -> None:
    for parse in (parse_client_hello, parse_server_hello):
        with contextlib.suppress(HelloParseError):
            parse(data)


@SETTINGS
@given(
    edits=st.lists(
        st.tuples(st.integers(min_value=0), st.integers(0, 255)), min_size=1, max_size=6
    ),
    which=st.sampled_from(["client", "server"]),
)
def test_corrupted_real_hellos_raise_only_hello_parse_error(
    captured: dict[str, Captured], edits: list[tuple[int, int]], which: str
) -> None:
    capture = captured["qkd"]
    body = bytearray(capture.client_body if which == "client" else capture.server_body)
    for pos, value in edits:
        body[pos % len(body)] = value
    parse = parse_client_hello if which == "client" else parse_server_hello
    try:
        parsed: ClientHello | ServerHello = parse(bytes(body))
    except HelloParseError:
        return
    assert isinstance(parsed, ClientHello | ServerHello)


def test_duplicate_extensions_are_refused(captured: dict[str, Captured]) -> None:
    prefix, extensions = split_client_hello(captured["qkd"].client_body)
    assert parse_client_hello(join_client_hello(prefix, extensions)) == parse_client_hello(
        captured["qkd"].client_body
    )
    groups_ext = next(e for e in extensions if e[0] == EXT_SUPPORTED_GROUPS)
    with pytest.raises(HelloParseError, match="duplicate extension 10"):
        parse_client_hello(join_client_hello(prefix, [*extensions, groups_ext]))
    unknown = (0xFAFA, b"")
    with pytest.raises(HelloParseError, match="duplicate extension"):
        parse_client_hello(join_client_hello(prefix, [unknown, *extensions, unknown]))
    key_share = ext(EXT_KEY_SHARE, u16(QKD_MLKEM768) + vec(2, b"x"))
    with pytest.raises(HelloParseError, match="duplicate extension 51"):
        parse_server_hello(server_hello_body([key_share, key_share]))


def test_two_key_shares_for_one_group_are_refused() -> None:
    groups = supported_groups_ext([QKD_MLKEM768, X25519MLKEM768])
    body = client_hello_body(
        [groups, client_key_share_ext([(QKD_MLKEM768, b"a"), (QKD_MLKEM768, b"b")])]
    )
    with pytest.raises(HelloParseError, match="two key shares"):
        parse_client_hello(body)
    body = client_hello_body(
        [groups, client_key_share_ext([(QKD_MLKEM768, b"a"), (X25519MLKEM768, b"b")])]
    )
    assert parse_client_hello(body).key_shares == (
        KeyShareEntry(QKD_MLKEM768, b"a"),
        KeyShareEntry(X25519MLKEM768, b"b"),
    )


def test_synthetic_client_hello_fields() -> None:
    body = client_hello_body(
        [
            server_name_ext("é.example".encode()),  # not parsed: any bytes will do
            supported_groups_ext([1, 2, 3]),
            supported_versions_ext([0x0304, 0x0303]),
            client_key_share_ext([]),
            ext(EXT_PADDING, bytes(10)),
        ]
    )
    hello = parse_client_hello(body)
    assert (hello.supported_groups, hello.key_shares) == ((1, 2, 3), ())
    assert hello.versions == (0x0304, 0x0303)
    assert hello.offers_tls13
    assert hello.cipher_suites == (0x1301, 0x1302)
    bare = parse_client_hello(client_hello_body([]))
    assert (bare.supported_groups, bare.key_shares, bare.versions) == ((), (), ())
    tls12 = parse_client_hello(client_hello_body([supported_versions_ext([0x0303])]))
    assert not tls12.offers_tls13


@pytest.mark.parametrize(
    ("body", "match"),
    [
        pytest.param(client_hello_body([], session_id=bytes(33)), "session id", id="long-sid"),
        pytest.param(
            client_hello_body([client_key_share_ext([(QKD_MLKEM768, b"")])]),
            "empty key_exchange",
            id="empty-share",
        ),
        pytest.param(
            client_hello_body([ext(EXT_SUPPORTED_GROUPS, vec(2, b"\x00\x17\x00"))]),
            "bad length",
            id="odd-groups",
        ),
        pytest.param(
            client_hello_body([ext(EXT_SUPPORTED_GROUPS, vec(2, b""))]),
            "bad length",
            id="no-groups",
        ),
        pytest.param(
            client_hello_body([ext(EXT_SUPPORTED_GROUPS, vec(2, b"\x00\x17") + b"\0")]),
            "trailing",
            id="groups-trailing",
        ),
        pytest.param(
            client_hello_body([client_key_share_ext([(1, b"a")])[:-1]]),
            "truncated",
            id="share-truncated",
        ),
        pytest.param(client_hello_body([], suites=b""), "cipher_suites", id="no-suites"),
        pytest.param(client_hello_body([], suites=b"\x13"), "cipher_suites", id="odd-suites"),
        pytest.param(
            client_hello_body([ext(EXT_SUPPORTED_VERSIONS, vec(1, b""))]),
            "supported_versions",
            id="no-versions",
        ),
        pytest.param(
            client_hello_body([ext(EXT_SUPPORTED_VERSIONS, vec(1, b"\x03\x04\x03"))]),
            "supported_versions",
            id="odd-versions",
        ),
    ],
)
def test_malformed_client_hellos_are_refused(body: bytes, match: str) -> None:
    with pytest.raises(HelloParseError, match=match):
        parse_client_hello(body)


def test_hello_retry_request_parses() -> None:
    body = hello_retry_body(ext(EXT_KEY_SHARE, u16(QKD_MLKEM768)))
    assert parse_server_hello(body) == ServerHello(True, QKD_MLKEM768, None)
    assert parse_server_hello(hello_retry_body()) == ServerHello(True, None, None)
    # A HelloRetryRequest names a group only; a full key share entry is malformed there.
    with pytest.raises(HelloParseError, match="trailing"):
        parse_server_hello(hello_retry_body(ext(EXT_KEY_SHARE, u16(QKD_MLKEM768) + vec(2, b"x"))))
    with pytest.raises(HelloParseError, match="truncated"):
        parse_server_hello(hello_retry_body(ext(EXT_KEY_SHARE, b"\x37")))


def test_hello_retry_random_without_tls13_is_an_ordinary_server_hello() -> None:
    entry = ext(EXT_KEY_SHARE, u16(QKD_MLKEM768) + vec(2, b"ct"))
    body = server_hello_body([entry], random=HELLO_RETRY_RANDOM)
    assert parse_server_hello(body) == ServerHello(False, QKD_MLKEM768, b"ct")


def test_synthetic_server_hellos_parse() -> None:
    entry = ext(EXT_KEY_SHARE, u16(QKD_MLKEM768) + vec(2, b"ct"))
    assert parse_server_hello(server_hello_body([entry])) == ServerHello(False, QKD_MLKEM768, b"ct")
    # Same random but for the last byte: an ordinary ServerHello.
    near = HELLO_RETRY_RANDOM[:-1] + bytes([HELLO_RETRY_RANDOM[-1] ^ 1])
    assert parse_server_hello(server_hello_body([entry], random=near)).hello_retry is False
    no_share = server_hello_body([ext(EXT_SUPPORTED_VERSIONS, b"\x03\x04")])
    assert parse_server_hello(no_share) == ServerHello(False, None, None)
    with pytest.raises(HelloParseError, match="session id"):
        parse_server_hello(server_hello_body([entry], session_id=bytes(33)))
    with pytest.raises(HelloParseError, match="empty key_exchange"):
        parse_server_hello(server_hello_body([ext(EXT_KEY_SHARE, u16(QKD_MLKEM768) + u16(0))]))
    with pytest.raises(HelloParseError, match="trailing"):
        parse_server_hello(server_hello_body([ext(EXT_KEY_SHARE, u16(1) + vec(2, b"a") + b"z")]))
