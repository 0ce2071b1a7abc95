"""Handshakes of the sans-I/O connection, client and server joined in memory: no sockets, a
hand-driven clock, key requests answered by a KME kept in a dict."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pytest

from qkdproxy.core.errors import LocalProtocolError
from qkdproxy.core.hybrid import HybridKem
from qkdproxy.core.keys import KeyNotFoundError, KeySourceUnavailableError, QkdKey
from qkdproxy.core.tls.connection import (
    ConnectionConfig,
    Event,
    HandshakeComplete,
    KeyNeeded,
    Outcome,
    Phase,
    TlsConnection,
)
from qkdproxy.core.tls.credentials import Credentials
from qkdproxy.core.tls.engine import EngineSpec
from qkdproxy.core.tls.events import DataReceived, Failed, Side
from qkdproxy.core.tls.identity import AllowList
from qkdproxy.core.tls.keyexchange import (
    CloseStream,
    FetchKey,
    Flow,
    KeyAnswer,
    KeyApi,
    KeyFailure,
    KeyRequest,
    OpenStream,
    QkdOptions,
    StreamKey,
    TakeKey,
)
from qkdproxy.core.tls.native import NativeEngineSpec
from qkdproxy.core.tls.tlslite_glue import TlsliteEngineSpec, install
from qkdproxy.core.tls.verify import PeerPolicy
from qkdproxy.core.tls.wire import Alert
from qkdproxy.keys.context import KeyContext
from qkdproxy.keys.sources import KeySources
from qkdproxy.sim.pki import CertificateAuthority
from qkdproxy.tools.loopback import CLIENT_URI, SERVER_NAME
from tests.conftest import groups


def wall_time() -> datetime:
    """The certificate-validation time a driver would pass in: when the handshake starts
    (the certificates are issued during the test, so not at import)."""
    return datetime.now(UTC)


TIMEOUT = 10.0


@dataclass
class Kme:
    """Both ends' KME: keys by id, ETSI 004 streams by KSID, and what was asked."""

    keys: dict[bytes, QkdKey] = field(default_factory=dict)
    streams: dict[bytes, bytes] = field(default_factory=dict)
    asked: list[KeyRequest] = field(default_factory=list)
    failing: type[Exception] | None = None
    silent: bool = False  # never answers (the handshake then times out)
    answers_left: int | None = None  # falls silent after this many answers
    unknown_ids: bool = False  # dec_keys knows no key id

    def speaks(self) -> bool:
        if self.silent or self.answers_left == 0:
            return False
        if self.answers_left is not None:
            self.answers_left -= 1
        return True

    def answer(self, request: KeyRequest) -> KeyAnswer:
        self.asked.append(request)
        if self.failing is not None:
            return KeyFailure(self.failing("the KME said no"))
        if isinstance(request, TakeKey):
            key = QkdKey(os.urandom(16), os.urandom(32))
            self.keys[key.key_id] = key
            return key
        if isinstance(request, FetchKey):
            found = None if self.unknown_ids else self.keys.get(request.key_id)
            return found if found else KeyFailure(KeyNotFoundError("unknown key"))
        if isinstance(request, OpenStream):
            ksid = request.ksid or os.urandom(16)
            self.streams.setdefault(ksid, os.urandom(32))
            return ksid
        if isinstance(request, StreamKey):
            return self.streams[request.ksid]
        return None


class Present:
    """A key source that is configured (the connection never calls it: the test answers)."""


ENGINE_SPECS: dict[str, Callable[[Credentials], EngineSpec]] = {
    "native": NativeEngineSpec.of,
    "tlslite": TlsliteEngineSpec.of,
}
_engine = {"client": "native", "server": "native"}


@pytest.fixture(
    autouse=True,
    params=[
        ("native", "native"),
        ("tlslite", "tlslite"),
        ("native", "tlslite"),
        ("tlslite", "native"),
    ],
    ids=lambda p: f"{p[0]}-client-{p[1]}-server",
)
def engine(request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    """Every test here runs on both handshake engines, and each against the other."""
    _engine["client"], _engine["server"] = request.param
    yield request.param
    _engine["client"] = _engine["server"] = "native"


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create()


def endpoint(
    ca: CertificateAuthority,
    hybrids: list[HybridKem],
    *,
    client: bool,
    allow: str | None = None,
    options: QkdOptions | None = None,
) -> tuple[ConnectionConfig, KeyContext]:
    install(g.group for g in hybrids)
    if client:
        credentials = ca.issue("client", [CLIENT_URI], server=False)
        policy = PeerPolicy(
            (ca.certificate,), AllowList.of([allow or f"dns:{SERVER_NAME}"]), SERVER_NAME
        )
    else:
        credentials = ca.issue("server", [SERVER_NAME], client=False)
        policy = PeerPolicy((ca.certificate,), AllowList.of([allow or f"uri:{CLIENT_URI}"]))
    config = ConnectionConfig(
        groups=hybrids,
        peer=policy,
        engine=ENGINE_SPECS[_engine["client" if client else "server"]](credentials),
        server_name=SERVER_NAME if client else None,
        alpn=None,
        handshake_timeout=TIMEOUT,
    )
    sources = KeySources(Present(), Present(), Present())  # type: ignore[arg-type]
    return config, KeyContext(sources, options or QkdOptions())


@dataclass
class Pair:
    client: TlsConnection
    server: TlsConnection
    kme: Kme
    now: float = 0.0
    events: dict[str, list[Event]] = field(default_factory=lambda: {"client": [], "server": []})

    def run(self, max_rounds: int = 50) -> None:
        """Move bytes and answer key requests until nothing moves."""
        for _ in range(max_rounds):
            moved = False
            for name, conn, peer in (
                ("client", self.client, self.server),
                ("server", self.server, self.client),
            ):
                for event in conn.next_events():
                    self.events[name].append(event)
                    if (
                        isinstance(event, KeyNeeded)
                        and not isinstance(event.request, CloseStream)
                        and self.kme.speaks()
                    ):
                        conn.answer_key(self.kme.answer(event.request), self.now)
                        moved = True
                if data := conn.data_to_send():
                    moved = True
                    if peer.phase is Phase.ESTABLISHED:
                        assert peer.records is not None
                        self.events["client" if peer is self.client else "server"] += (
                            peer.records.receive(data, self.now)
                        )
                    else:
                        peer.receive_data(data, self.now)
            if not moved:
                return
        raise AssertionError("the handshake never settled")

    def of(self, name: str, kind: type) -> list[object]:
        return [e for e in self.events[name] if isinstance(e, kind)]


def pair(
    ca: CertificateAuthority,
    client_groups: list[HybridKem],
    server_groups: list[HybridKem] | None = None,
    *,
    kme: Kme | None = None,
    options: QkdOptions | None = None,
    server_options: QkdOptions | None = None,
    client_allow: str | None = None,
    server_allow: str | None = None,
    configure: Callable[[ConnectionConfig, bool], ConnectionConfig] | None = None,
) -> Pair:
    client_config, client_keys = endpoint(
        ca, client_groups, client=True, allow=client_allow, options=options
    )
    server_config, server_keys = endpoint(
        ca, server_groups or client_groups, client=False, allow=server_allow, options=server_options
    )
    if configure is not None:
        client_config, server_config = (
            configure(client_config, True),
            configure(server_config, False),
        )
    p = Pair(
        TlsConnection(client_config, client_keys, is_client=True, wall_time=wall_time()),
        TlsConnection(server_config, server_keys, is_client=False, wall_time=wall_time()),
        kme or Kme(),
    )
    p.server.start(p.now)
    p.client.start(p.now)
    p.run()
    return p


def completed(p: Pair) -> tuple[HandshakeComplete, HandshakeComplete]:
    client = p.of("client", HandshakeComplete)
    server = p.of("server", HandshakeComplete)
    assert len(client) == len(server) == 1, p.events
    assert p.client.phase is p.server.phase is Phase.ESTABLISHED
    return client[0], server[0]  # type: ignore[return-value]


def assert_data_flows(p: Pair) -> None:
    assert p.client.records is not None and p.server.records is not None
    p.client.records.send_data(b"ping")
    p.client.records.update_keys(request_peer=True)
    events = p.server.records.receive(p.client.data_to_send(), p.now)
    assert DataReceived(b"ping") in events
    p.server.records.send_data(b"pong")
    assert DataReceived(b"pong") in p.client.records.receive(p.server.data_to_send(), p.now)


@pytest.mark.parametrize("name", ["x25519", "X25519MLKEM768"])
def test_a_handshake_without_qkd_asks_no_key(ca: CertificateAuthority, name: str) -> None:
    p = pair(ca, groups(name))
    client, server = completed(p)
    assert client.record.group == server.record.group == name
    assert p.kme.asked == []
    assert_data_flows(p)


@pytest.mark.parametrize("flow", list(Flow))
def test_both_flows_use_one_qkd_key_on_both_sides(ca: CertificateAuthority, flow: Flow) -> None:
    p = pair(ca, groups("qkd_mlkem768"), options=QkdOptions(flow=flow))
    client, server = completed(p)
    assert client.record.qkd_key_id == server.record.qkd_key_id is not None
    assert client.record.flow is server.record.flow is flow
    # Whoever originates takes a key (enc_keys); the other side fetches it (dec_keys).
    assert [type(r) for r in p.kme.asked] == [TakeKey, FetchKey]
    assert_data_flows(p)


def test_etsi_004_streams_are_opened_then_closed(ca: CertificateAuthority) -> None:
    options = QkdOptions(api=KeyApi.ETSI_004)
    p = pair(ca, groups("qkd_mlkem768"), options=options, server_options=options)
    completed(p)
    kinds = [type(r) for r in p.kme.asked]
    assert kinds.count(OpenStream) == 2 and kinds.count(StreamKey) == 2
    needed = [e for n in ("client", "server") for e in p.of(n, KeyNeeded)]
    closes = [e for e in needed if isinstance(e, KeyNeeded) and isinstance(e.request, CloseStream)]
    assert len(closes) == 2  # both ends close their stream once the handshake is done


def test_a_hello_retry_request_costs_one_extra_round_and_no_extra_key(
    ca: CertificateAuthority,
) -> None:
    # The client's key share is for x25519, which the server does not take.
    p = pair(ca, groups("x25519", "qkd_mlkem768"), groups("qkd_mlkem768"))
    client, server = completed(p)
    assert client.record.hello_retry and server.record.hello_retry
    assert client.record.group == "qkd_mlkem768"
    assert [type(r) for r in p.kme.asked] == [TakeKey, FetchKey]


def failure(p: Pair, name: str) -> Failed:
    failures = p.of(name, Failed)
    assert len(failures) == 1, p.events
    return failures[0]  # type: ignore[return-value]


def test_a_kme_failure_is_ours_and_named_as_such(ca: CertificateAuthority) -> None:
    p = pair(ca, groups("qkd_mlkem768"), kme=Kme(failing=KeySourceUnavailableError))
    client = failure(p, "client")
    assert (client.alert, client.side) == (Alert.INTERNAL_ERROR, Side.LOCAL)
    assert p.client.error is not None and p.client.error.may_be_kme
    assert p.server.phase is Phase.FAILED  # the client's plaintext alert reached it


def test_an_unknown_key_id_is_refused_with_illegal_parameter(ca: CertificateAuthority) -> None:
    p = pair(ca, groups("qkd_mlkem768"), kme=Kme(unknown_ids=True))
    server = failure(p, "server")
    assert (server.alert, server.side) == (Alert.ILLEGAL_PARAMETER, Side.LOCAL)
    assert p.server.error is not None and not p.server.error.may_be_kme
    client = failure(p, "client")
    assert (client.alert, client.side) == (Alert.ILLEGAL_PARAMETER, Side.REMOTE)


def test_a_silent_kme_ends_in_a_timeout_driven_by_the_clock(ca: CertificateAuthority) -> None:
    p = pair(ca, groups("qkd_mlkem768"), kme=Kme(silent=True))
    assert p.client.waiting_for_key and p.client.get_timer() == TIMEOUT
    p.client.handle_timer(TIMEOUT - 0.001)
    assert p.client.waiting_for_key
    p.client.handle_timer(TIMEOUT)
    assert p.client.phase is Phase.FAILED
    assert p.client.error is not None and p.client.error.outcome is Outcome.TIMEOUT
    # The key taken was settled (wasted), and a late answer changes nothing.
    p.client.answer_key(None, TIMEOUT + 1)
    assert p.client.phase is Phase.FAILED


def test_a_peer_outside_the_allow_list_gets_access_denied(ca: CertificateAuthority) -> None:
    p = pair(ca, groups("x25519"), server_allow="uri:spiffe://qkdproxy.test/someone-else")
    server = failure(p, "server")
    assert (server.alert, server.side) == (Alert.ACCESS_DENIED, Side.LOCAL)
    client = failure(p, "client")
    assert (client.alert, client.side) == (Alert.ACCESS_DENIED, Side.REMOTE)


def test_a_server_outside_the_allow_list_is_refused_by_the_client(
    ca: CertificateAuthority,
) -> None:
    p = pair(ca, groups("x25519"), client_allow="dns:elsewhere.qkdproxy.test")
    client = failure(p, "client")
    assert client.side is Side.LOCAL and client.alert is not None
    assert p.client.verified is None


def test_no_group_in_common_is_a_handshake_failure(ca: CertificateAuthority) -> None:
    p = pair(ca, groups("x25519"), groups("qkd_mlkem768"))
    server = failure(p, "server")
    assert server.alert == Alert.HANDSHAKE_FAILURE
    assert p.kme.asked == []


def test_the_peer_closing_mid_handshake_is_not_a_clean_end(ca: CertificateAuthority) -> None:
    config, keys = endpoint(ca, groups("x25519"), client=True)
    client = TlsConnection(config, keys, is_client=True, wall_time=wall_time())
    client.start(0.0)
    assert client.data_to_send()  # the ClientHello
    client.receive_eof(1.0)
    assert client.phase is Phase.FAILED
    assert client.error is not None and client.error.outcome is Outcome.PEER_CLOSED


def test_a_malformed_server_hello_gets_decode_error(ca: CertificateAuthority) -> None:
    config, keys = endpoint(ca, groups("x25519"), client=True)
    client = TlsConnection(config, keys, is_client=True, wall_time=wall_time())
    client.start(0.0)
    client.data_to_send()
    client.receive_data(bytes.fromhex("160303000602000002ffff"), 1.0)
    assert client.phase is Phase.FAILED
    assert client.data_to_send().endswith(bytes([21, 3, 3, 0, 2, 2, Alert.DECODE_ERROR]))


def test_an_answer_nobody_asked_for_is_our_bug(ca: CertificateAuthority) -> None:
    config, keys = endpoint(ca, groups("x25519"), client=False)
    server = TlsConnection(config, keys, is_client=False, wall_time=wall_time())
    server.start(0.0)
    with pytest.raises(LocalProtocolError):
        server.answer_key(None, 0.0)


@pytest.mark.parametrize("updates", [0, 1])
def test_a_plaintext_close_notify_right_after_the_handshake_is_refused(
    ca: CertificateAuthority, updates: int
) -> None:
    p = pair(ca, groups("x25519"))
    completed(p)
    assert p.client.records is not None and p.server.records is not None
    for _ in range(updates):
        p.client.records.update_keys()
    p.server.records.receive(p.client.data_to_send(), 1.0)
    events = p.server.records.receive(bytes.fromhex("15030300020100"), 1.0)
    assert events == [Failed(Alert.UNEXPECTED_MESSAGE, Side.LOCAL, events[0].reason)]  # type: ignore[union-attr]


def answer_keys(conn: TlsConnection, kme: Kme) -> None:
    """Answer what ``conn`` asked, until it asks nothing more."""
    while requests := [e for e in conn.next_events() if isinstance(e, KeyNeeded)]:
        for event in requests:
            if not isinstance(event.request, CloseStream):
                conn.answer_key(kme.answer(event.request), 0.0)


def retrying_pair(ca: CertificateAuthority) -> tuple[TlsConnection, TlsConnection, Kme]:
    # The client's key share is for x25519, which the server does not take: one retry.
    client_config, client_keys = endpoint(ca, groups("x25519", "qkd_mlkem768"), client=True)
    server_config, server_keys = endpoint(ca, groups("qkd_mlkem768"), client=False)
    client = TlsConnection(client_config, client_keys, is_client=True, wall_time=wall_time())
    server = TlsConnection(server_config, server_keys, is_client=False, wall_time=wall_time())
    server.start(0.0)
    client.start(0.0)
    return client, server, Kme()


def test_a_second_hello_retry_request_is_refused_before_it_costs_a_key(
    ca: CertificateAuthority,
) -> None:
    client, server, kme = retrying_pair(ca)
    answer_keys(client, kme)
    server.receive_data(client.data_to_send(), 0.0)
    answer_keys(server, kme)
    retry = server.data_to_send()
    client.receive_data(retry, 0.0)
    answer_keys(client, kme)
    assert client.phase is Phase.HANDSHAKE and client.kex.record.hello_retry
    asked = len(kme.asked)
    client.receive_data(retry, 0.0)  # replayed by someone on path
    failed = [e for e in client.next_events() if isinstance(e, Failed)]
    assert [(f.alert, f.side) for f in failed] == [(Alert.UNEXPECTED_MESSAGE, Side.LOCAL)]
    assert len(kme.asked) == asked


def test_a_second_client_hello_without_the_share_is_refused(ca: CertificateAuthority) -> None:
    client, server, kme = retrying_pair(ca)
    answer_keys(client, kme)
    first_hello = client.data_to_send()
    server.receive_data(first_hello, 0.0)
    answer_keys(server, kme)
    assert server.kex.record.hello_retry
    server.data_to_send()
    server.receive_data(first_hello, 0.0)  # again, still without a qkd_mlkem768 share
    failed = [e for e in server.next_events() if isinstance(e, Failed)]
    assert [(f.alert, f.side) for f in failed] == [(Alert.ILLEGAL_PARAMETER, Side.LOCAL)]
    assert server.error is not None and server.error.reason == "no key share after retry"
    assert kme.asked == []


def test_a_timeout_closes_the_etsi_004_streams_it_opened(ca: CertificateAuthority) -> None:
    options = QkdOptions(api=KeyApi.ETSI_004)
    kme = Kme(answers_left=3)  # the client's OPEN_CONNECT, the server's OPEN and GET_KEY
    p = pair(ca, groups("qkd_mlkem768"), kme=kme, options=options, server_options=options)
    assert p.client.waiting_for_key  # its GET_KEY is never answered
    p.client.handle_timer(TIMEOUT)
    events = p.client.next_events()
    closes = [e for e in events if isinstance(e, KeyNeeded) and isinstance(e.request, CloseStream)]
    client_ksid = next(iter(kme.streams))  # the stream the client opened first
    assert [c.request for c in closes] == [CloseStream(client_ksid)]
    assert any(isinstance(e, Failed) for e in events)
