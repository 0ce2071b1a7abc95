"""Each hello is parsed once (issue 16): the connection's parse of a ClientHello (server)
or ServerHello (client), taken by the native engine for its own checks, must leave every
refusal as it was with the engine's own parse: the same alert for the same first fault, the
same answer to a hello it accepts."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from qkdproxy.core.tls.engine import LocalAlertError
from qkdproxy.core.tls.hello import (
    HelloParseError,
    ParsedClientHello,
    ParsedServerHello,
    parse_server_hello,
    read_client_hello,
    read_server_hello,
)
from qkdproxy.core.tls.native import NativeClient, NativeServer
from qkdproxy.core.tls.native import messages as m
from qkdproxy.core.tls.native import server as native_server
from qkdproxy.core.tls.native.common import Identity
from qkdproxy.core.tls.records import HEADER, MAX_PLAINTEXT
from qkdproxy.core.tls.wire import Alert, ContentType, HeldHello
from tests.conftest import groups
from tests.integration.test_wire_hello import Captured
from tests.native_forge import rebuild_hello
from tests.native_harness import CLIENT, SERVER, Identities, link
from tests.unit.test_fuzz_parsers import (
    client_hello_fields,
    fuzz_settings,
    mutated,
    real,  # noqa: F401 - fixture
    server_hello_fields,
)
from tests.unit.test_native_hostile import X25519, hello_edit, refused, scripted_client


@pytest.fixture(scope="module")
def ids() -> Identities:
    return Identities.create()


class Hooks:
    """A key exchange that answers any share (the engine's checks are under test here)."""

    def key_share(self, group: int) -> tuple[bytes, object]:
        return group.to_bytes(2, "big") * 16, None

    def shared_secret(self, group: int, peer_share: bytes) -> bytes:
        return hashlib.sha384(peer_share).digest()


def plaintext_records(message: bytes) -> bytes:
    """``message`` in plaintext handshake records, as a peer would send it."""
    out = bytearray()
    for start in range(0, len(message), MAX_PLAINTEXT):
        chunk = message[start : start + MAX_PLAINTEXT]
        out += HEADER.pack(ContentType.HANDSHAKE, 0x0301, len(chunk)) + chunk
    return bytes(out)


def answer(
    identity: Identity,
    captured: Captured,
    message: bytes,
    given_parse: ParsedClientHello | None,
    retry: bool,
) -> tuple[object, ...]:
    """What a native server does with ``message``: fed as bytes only, or with the
    connection's parse of it. Its random is fixed, so two runs can be compared byte for byte."""
    engine = NativeServer(Hooks(), identity, alpn=[b"h2"], random=bytes)
    offered = captured.offered[1:] if retry else captured.offered
    engine.start_server([h.group for h in offered])
    records = plaintext_records(message)
    if given_parse is None:
        engine.feed(records)
    else:
        engine.feed_client_hello(HeldHello(message, records), given_parse)
    return (*outcome(engine), engine.eku_peer, engine.alpn)


def outcome(engine: NativeClient | NativeServer) -> tuple[object, ...]:
    """How ``engine`` takes what it was fed: the alert and its reason, or whether it
    completed; then what it sends and where it is."""
    try:
        result: tuple[object, ...] = ("step", engine.step())
    except LocalAlertError as exc:
        result = ("alert", exc.description, exc.message)
    return (*result, engine.take_output(), engine.state)


# What an edited extension may hold: TLS versions, groups, signature schemes and junk.
CODES = (0x0303, 0x0304, 0x001D, 0x0017, 0x11EC, 0x0403, 0x0804, 0x0201, 0x1302)
EDITED = (m.SUPPORTED_VERSIONS, m.SUPPORTED_GROUPS, m.SIGNATURE_ALGORITHMS, m.KEY_SHARE, m.ALPN)


@st.composite
def edited_hellos(draw: st.DrawFn, captured: Captured) -> bytes:
    """The real ClientHello with a few extensions dropped or refilled, its suites or its
    compression methods replaced: well-framed hellos that reach the engine's checks."""
    codes = st.lists(st.sampled_from(CODES + tuple(h.group.code_point for h in captured.offered)))
    entries = st.lists(st.tuples(codes.map(lambda c: c[0] if c else 0), st.binary(max_size=3)))
    contents = st.one_of(
        st.none(),
        st.binary(max_size=6),
        codes.map(lambda c: m.u16_vector(c, 1)),
        codes.map(lambda c: m.u16_vector(c, 2)),
        entries.map(
            lambda e: m.vector(b"".join(g.to_bytes(2, "big") + m.vector(k, 2) for g, k in e), 2)
        ),
    )
    changes = draw(st.dictionaries(st.sampled_from(EDITED), contents, max_size=3))

    def edit(exts: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
        kept = [(t, changes.get(t, d)) for t, d in exts]
        added = [(t, d) for t, d in changes.items() if t not in dict(exts)]
        return [(t, d) for t, d in kept + added if d is not None]

    suites = draw(
        st.none()
        | st.lists(st.sampled_from((0x1301, 0x1302, 0x1303, 0x009C)), min_size=1).map(tuple)
    )
    hello = rebuild_hello(captured.client_message, edit, suites)
    methods = draw(st.sampled_from((b"\x00", b"", b"\x01", b"\x00\x01")))
    return with_compression(methods)(hello, False)[4:]


@fuzz_settings(300)
@given(st.data(), st.sampled_from(["qkd", "triple"]), st.booleans(), st.booleans())
def test_the_connections_parse_changes_nothing_the_engine_does(
    real: dict[str, Captured],  # noqa: F811 - fixture
    ids: Identities,
    monkeypatch: pytest.MonkeyPatch,
    data: st.DataObject,
    source: str,
    retry: bool,
    structured: bool,
) -> None:
    # ECDSA signs with a fresh nonce: a signature that depends on its input only lets the
    # two answers be compared whole.
    monkeypatch.setattr(native_server, "sign", lambda _key, _scheme, content: content[-48:])
    captured = real[source]
    seed = captured.client_body
    if structured:
        body = data.draw(edited_hellos(captured))
    else:
        body = data.draw(mutated(seed, client_hello_fields(seed)) | st.just(seed))
    try:
        parsed = read_client_hello(body)
    except HelloParseError:
        event("refused by the connection's parse")
        return  # the connection hands the engine the bytes only
    identity = Identity.of(ids.server)
    message = m.message(m.CLIENT_HELLO, body)
    alone = answer(identity, captured, message, None, retry)
    event(f"{alone[0]} {alone[1]}")
    assert answer(identity, captured, message, parsed, retry) == alone


def with_compression(methods: bytes) -> Callable[[bytes, bool], bytes]:
    """A ClientHello edit: its compression methods replaced."""

    def apply(hello: bytes, second: bool) -> bytes:
        body = hello[4:]
        pos = 34 + 1 + body[34]
        pos += 2 + int.from_bytes(body[pos : pos + 2], "big")
        rest = body[pos + 1 + body[pos] :]
        return m.message(m.CLIENT_HELLO, body[:pos] + m.vector(methods, 1) + rest)

    return apply


@pytest.mark.parametrize(
    ("methods", "alert"),
    [
        (b"", Alert.DECODE_ERROR),  # the connection's parse takes it; the engine's does not
        (b"\x01", Alert.ILLEGAL_PARAMETER),
        (b"\x01\x00", Alert.ILLEGAL_PARAMETER),
    ],
    ids=["none", "deflate", "deflate-and-null"],
)
def test_a_client_hello_without_only_null_compression_is_refused(
    ids: Identities, methods: bytes, alert: Alert
) -> None:
    result = link(
        ids, X25519, client_engine=scripted_client(ids, hello_edit=with_compression(methods))
    )
    refused(result, SERVER, alert)


def test_a_duplicate_extension_is_refused_before_an_empty_compression_list(
    ids: Identities,
) -> None:
    """The connection refuses the duplicate itself, as before the engine saw the hello."""
    empty = with_compression(b"")
    duplicate = hello_edit(lambda e: [*e, e[-1]])
    edit = lambda hello, second: empty(duplicate(hello, second), second)  # noqa: E731
    result = link(ids, X25519, client_engine=scripted_client(ids, hello_edit=edit))
    refused(result, SERVER, Alert.ILLEGAL_PARAMETER)


def reply(
    identity: Identity, captured: Captured, message: bytes, given_parse: ParsedServerHello | None
) -> tuple[object, ...]:
    """What a native client that offered the captured groups (its share for the group the
    captured server chose, its random and session id zero) does with ``message``: fed as
    bytes only, or with the connection's parse of it."""
    engine = NativeClient(Hooks(), identity, alpn=None, random=bytes)
    chosen = parse_server_hello(captured.server_body).group
    share = next(h.group for h in captured.offered if h.group.code_point == chosen)
    engine.start_client([h.group for h in captured.offered], share)
    engine.take_output()
    records = plaintext_records(message)
    if given_parse is None:
        engine.feed(records)
    else:
        engine.feed_server_hello(HeldHello(message, records), given_parse)
    return outcome(engine)


def server_hello_seed(captured: Captured, retry: bool) -> bytes:
    """The captured ServerHello echoing a zero session id, or a HelloRetryRequest for the
    captured client's other group."""
    answer = parse_server_hello(captured.server_body)
    if retry:
        other = next(h for h in captured.offered if h.group.code_point != answer.group)
        exts = [
            m.extension(m.SUPPORTED_VERSIONS, m.TLS13.to_bytes(2, "big")),
            m.extension(m.KEY_SHARE, other.group.code_point.to_bytes(2, "big")),
        ]
        return m.server_hello(m.HELLO_RETRY_RANDOM, bytes(32), 0x1302, exts)[4:]
    body = captured.server_body
    return body[:34] + m.vector(bytes(32), 1) + body[35 + body[34] :]


@fuzz_settings(300)
@given(st.data(), st.sampled_from(["qkd", "triple"]), st.booleans())
def test_the_connections_parse_changes_nothing_the_client_does(
    real: dict[str, Captured],  # noqa: F811 - fixture
    ids: Identities,
    data: st.DataObject,
    source: str,
    retry: bool,
) -> None:
    captured = real[source]
    seed = server_hello_seed(captured, retry)
    body = data.draw(mutated(seed, server_hello_fields(seed)) | st.just(seed))
    try:
        parsed = read_server_hello(body)
    except HelloParseError:
        event("refused by the connection's parse")
        return  # the connection refuses it itself: the engine never sees it
    identity = Identity.of(ids.client)
    message = m.message(m.SERVER_HELLO, body)
    alone = reply(identity, captured, message, None)
    event(f"{alone[0]} {alone[1]}")
    assert reply(identity, captured, message, parsed) == alone


@pytest.mark.parametrize("retry", [False, True], ids=["one-hello", "hello-retry"])
def test_each_hello_is_parsed_once(
    ids: Identities, monkeypatch: pytest.MonkeyPatch, retry: bool
) -> None:
    def parse_again(body: bytes) -> None:
        raise AssertionError("a hello was parsed a second time")

    monkeypatch.setattr(m, "parse_client_hello", parse_again)
    monkeypatch.setattr(m, "parse_server_hello", parse_again)
    if retry:  # the client's share is for x25519, the server takes secp256r1 only
        result = link(ids, groups("x25519", "secp256r1"), groups("secp256r1"))
    else:
        result = link(ids, X25519)
    assert result.complete(CLIENT) and result.complete(SERVER), result.events
    assert result.conn(SERVER).kex.record.hello_retry is retry
