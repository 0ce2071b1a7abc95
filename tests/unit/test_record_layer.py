"""Our post-handshake record layer, in memory: client and server layers joined by hand,
time driven by hand, no sockets."""

from __future__ import annotations

import pytest
from tlslite.utils.cryptomath import HKDF_expand_label  # the reference implementation

from qkdproxy.core.errors import LocalProtocolError
from qkdproxy.core.tls.events import (
    DataReceived,
    Failed,
    KeysUpdated,
    PeerClosed,
    RecordEvent,
    Side,
    Truncated,
)
from qkdproxy.core.tls.record_layer import (
    CIPHER_SUITES,
    Direction,
    KeyUpdatePolicy,
    Phase,
    RecordLayer,
)
from qkdproxy.core.tls.records import HEADER, open_record, seal_inner
from qkdproxy.core.tls.wire import Alert, ContentType

CLIENT_SECRET = bytes(range(48))
SERVER_SECRET = bytes(range(100, 148))
PLAINTEXT_CLOSE_NOTIFY = bytes.fromhex("15030300020100")
FORGED = {
    "plaintext-close-notify": PLAINTEXT_CLOSE_NOTIFY,
    "plaintext-fatal-alert": bytes.fromhex("15030300020228"),
    "change-cipher-spec": bytes.fromhex("140303000101"),
    "plaintext-key-update": bytes.fromhex("160303000518000001 01".replace(" ", "")),
    # The outer type of protected records: undecryptable rather than unprotected.
    "unprotected-data": bytes.fromhex("1703030003616263"),
}
KEY_UPDATE_REQUESTED = bytes([24, 0, 0, 1, 1])
KEY_UPDATE_NOT_REQUESTED = bytes([24, 0, 0, 1, 0])


def pair(
    suite: int = 0x1302, policy: KeyUpdatePolicy | None = None, send_limit: int = 1 << 14
) -> tuple[RecordLayer, RecordLayer]:
    """A client and a server record layer that share their traffic secrets."""
    spec = CIPHER_SUITES[suite]
    client = RecordLayer(
        Direction(spec, SERVER_SECRET),
        Direction(spec, CLIENT_SECRET),
        is_client=True,
        policy=policy,
        send_limit=send_limit,
    )
    server = RecordLayer(
        Direction(spec, CLIENT_SECRET),
        Direction(spec, SERVER_SECRET),
        is_client=False,
        policy=policy,
    )
    return client, server


def deliver(sender: RecordLayer, receiver: RecordLayer, now: float = 0.0) -> list[RecordEvent]:
    return receiver.receive(sender.data_to_send(), now)


def data_of(events: list[RecordEvent]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, DataReceived))


@pytest.mark.parametrize("suite", sorted(CIPHER_SUITES))
def test_data_flows_both_ways_under_every_suite(suite: int) -> None:
    client, server = pair(suite)
    client.send_data(b"x" * 40_000)
    assert data_of(deliver(client, server)) == b"x" * 40_000
    server.send_data(b"answer")
    assert data_of(deliver(server, client)) == b"answer"


def test_records_respect_the_peers_record_size_limit() -> None:
    client, server = pair(send_limit=1000)
    client.send_data(bytes(2500))
    wire = client.data_to_send()
    lengths = []
    pos = 0
    while pos < len(wire):
        _, _, length = HEADER.unpack_from(wire, pos)
        lengths.append(length)
        pos += HEADER.size + length
    assert lengths == [1000 + 17, 1000 + 17, 500 + 17]
    assert data_of(server.receive(wire, 0.0)) == bytes(2500)


def test_a_record_split_anywhere_arrives_whole() -> None:
    client, server = pair()
    client.send_data(b"split me")
    client.update_keys()
    client.send_data(b"after the update")
    wire = client.data_to_send()
    received = []
    for i in range(len(wire)):
        received += server.receive(wire[i : i + 1], 0.0)
    assert data_of(received) == b"split meafter the update"
    assert KeysUpdated("read", False) in received


@pytest.mark.parametrize("requested", [False, True])
def test_key_updates_both_ways(requested: bool) -> None:
    client, server = pair()
    for round_ in range(3):
        client.update_keys(request_peer=requested)
        client.send_data(b"c%d" % round_)
        events = deliver(client, server, float(round_))
        assert data_of(events) == b"c%d" % round_
        assert KeysUpdated("read", requested) in events
        assert (KeysUpdated("write") in events) is requested
        server.update_keys()
        server.send_data(b"s%d" % round_)
        assert data_of(deliver(server, client)) == (b"s%d" % round_)
    assert server.key_updates_answered == (3 if requested else 0)


def failed(events: list[RecordEvent]) -> Failed:
    failures = [e for e in events if isinstance(e, Failed)]
    assert len(failures) == 1, events
    assert not any(isinstance(e, PeerClosed) for e in events), events
    return failures[0]


def peer_hears(layer: RecordLayer, peer_read: Direction) -> list[tuple[int, bytes]]:
    """The records ``layer`` queued, opened as its peer would."""
    wire = layer.data_to_send()
    heard = []
    while wire:
        record = open_record(peer_read.keys, wire)
        assert record is not None
        heard.append((record.content_type, record.content))
        wire = wire[record.size :]
    return heard


@pytest.mark.parametrize("name", sorted(FORGED))
@pytest.mark.parametrize("direction", ["to-server", "to-client"])
@pytest.mark.parametrize("updates", [0, 1, 2])
@pytest.mark.parametrize("records_before", [0, 1, 3])
def test_an_unprotected_record_is_refused_at_every_sequence_number(
    name: str, direction: str, updates: int, records_before: int
) -> None:
    client, server = pair()
    sender, receiver = (client, server) if direction == "to-server" else (server, client)
    for _ in range(updates):
        sender.update_keys()
    for i in range(records_before):
        sender.send_data(b"r%d" % i)
    assert not any(isinstance(e, Failed) for e in deliver(sender, receiver))
    assert receiver.read.seqnum == records_before  # 0 right after a KeyUpdate: the old hole
    peer_read = Direction(sender.read.suite, sender.read.secret, sender.read.seqnum)
    events = receiver.receive(FORGED[name], 1.0)
    failure = failed(events)
    alert = Alert.BAD_RECORD_MAC if name == "unprotected-data" else Alert.UNEXPECTED_MESSAGE
    assert (failure.alert, failure.side) == (alert, Side.LOCAL)
    assert receiver.phase is Phase.FAILED
    # The refusal itself is protected: an on-path attacker cannot forge it either.
    assert peer_hears(receiver, peer_read) == [(ContentType.ALERT, bytes([2, alert]))]
    # Nothing the forger sends next is taken, not even a genuine-looking end.
    assert receiver.receive(PLAINTEXT_CLOSE_NOTIFY, 2.0) == []
    assert receiver.receive_eof() == []


def test_only_a_protected_close_notify_is_a_clean_end() -> None:
    client, server = pair()
    client.update_keys()
    client.close()
    events = deliver(client, server)
    assert events[-1] == PeerClosed()
    assert server.phase is Phase.CLOSED
    # The server answers with its own close_notify and sends nothing after it.
    answer = peer_hears(server, Direction(CIPHER_SUITES[0x1302], SERVER_SECRET))
    assert answer == [(ContentType.ALERT, bytes([1, 0]))]
    with pytest.raises(LocalProtocolError):
        server.send_data(b"late")


def test_an_end_of_transport_without_close_notify_is_a_truncation() -> None:
    client, server = pair()
    client.send_data(b"partial")
    deliver(client, server)
    assert server.receive_eof() == [Truncated("peer closed the transport without close_notify")]
    with pytest.raises(LocalProtocolError):
        server.update_keys()


def test_a_fatal_alert_from_the_peer_is_reported_as_theirs() -> None:
    client, server = pair()
    client.fail(Alert.ILLEGAL_PARAMETER, "test")
    failure = failed(deliver(client, server))
    assert (failure.alert, failure.side) == (Alert.ILLEGAL_PARAMETER, Side.REMOTE)
    assert server.data_to_send() == b""  # no answer to a fatal alert


def test_user_canceled_is_followed_by_close_notify() -> None:
    client, server = pair()
    client._out.append(seal_inner(client.write.keys, bytes([1, 90]), ContentType.ALERT))
    client.close()
    assert deliver(client, server) == [PeerClosed()]


def protected(layer: RecordLayer, content: bytes, content_type: int) -> bytes:
    return seal_inner(layer.write.keys, content, content_type)


@pytest.mark.parametrize(
    ("name", "records", "alert"),
    [
        ("KeyUpdate with data behind it", [(KEY_UPDATE_NOT_REQUESTED + b"\x18", 22)], 10),
        ("KeyUpdate of two bytes", [(bytes([24, 0, 0, 2, 0, 0]), 22)], 50),
        ("KeyUpdate request 2", [(bytes([24, 0, 0, 1, 2]), 22)], 47),
        ("ticket sent to a server", [(bytes([4, 0, 0, 1, 0]), 22)], 10),
        ("certificate request", [(bytes([13, 0, 0, 1, 0]), 22)], 10),
        ("oversized handshake message", [(bytes([4, 2, 0, 1]), 22)], 10),
        ("empty handshake record", [(b"", 22)], 10),
        ("data inside a message", [(bytes([4, 0, 0, 9, 0]), 22), (b"data", 23)], 10),
        ("alert inside a message", [(bytes([4, 0, 0, 9, 0]), 22), (bytes([1, 0]), 21)], 10),
        ("alert of three bytes", [(bytes([1, 0, 0]), 21)], 50),
        ("unknown inner type", [(b"x", 99)], 10),
        ("change_cipher_spec inside", [(b"\x01", 20)], 10),
    ],
)
def test_malformed_protected_records_end_with_the_right_alert(
    name: str, records: list[tuple[bytes, int]], alert: int
) -> None:
    client, server = pair()
    wire = b"".join(protected(client, content, kind) for content, kind in records)
    failure = failed(server.receive(wire, 0.0))
    assert (failure.alert, failure.side) == (alert, Side.LOCAL), name


def test_a_client_drops_tickets_even_in_fragments() -> None:
    client, server = pair()
    ticket = bytes([4, 0, 0, 200]) + bytes(200)
    wire = protected(server, ticket[:50], 22) + protected(server, ticket[50:], 22)
    wire += protected(server, b"after", 23)
    assert client.receive(wire, 0.0) == [DataReceived(b"after")]


@pytest.mark.parametrize(
    "wire",
    [
        pytest.param(lambda c: protected(c, b"x", 23)[:-1] + b"\x00", id="tampered"),
        pytest.param(lambda c: HEADER.pack(23, 0x0303, (1 << 14) + 257), id="oversized"),
        pytest.param(lambda c: HEADER.pack(23, 0x0303, 16) + bytes(16), id="below-a-tag"),
        pytest.param(lambda c: protected(c, bytes(40), 0), id="padding-only"),
    ],
)
def test_records_that_cannot_be_opened_end_the_stream(wire) -> None:  # type: ignore[no-untyped-def]
    client, server = pair()
    failure = failed(server.receive(wire(client), 0.0))
    assert failure.side is Side.LOCAL
    assert failure.alert in (Alert.BAD_RECORD_MAC, Alert.RECORD_OVERFLOW, Alert.UNEXPECTED_MESSAGE)


# ----------------------------------------------------------------- KeyUpdate flood


def test_a_batch_of_key_update_requests_gets_one_answer() -> None:
    client, server = pair()
    for _ in range(1000):
        client.update_keys(request_peer=True)
    events = deliver(client, server)
    assert server.key_updates_received == 1000
    assert server.key_updates_answered == 1
    assert [e for e in events if isinstance(e, KeysUpdated) and e.direction == "write"] == [
        KeysUpdated("write")
    ]
    # The one answer is a KeyUpdate(update_not_requested) the client can follow.
    server.send_data(b"still in step")
    assert data_of(deliver(server, client)) == b"still in step"


def test_key_update_requests_beyond_the_budget_end_the_connection() -> None:
    policy = KeyUpdatePolicy(rate=2.0, burst=5.0)
    client, server = pair(policy=policy)
    answers_at: list[float] = []
    now = 0.0
    for _ in range(40):  # one request per batch, 10 batches per second of the hand clock
        client.update_keys(request_peer=True)
        events = deliver(client, server, now)
        if KeysUpdated("write") in events:
            answers_at.append(now)
        if any(isinstance(e, Failed) for e in events):
            break
        deliver(server, client)
        now += 0.1
    # 5 from the burst, then 2 per second until the requests outrun the budget.
    assert len(answers_at) == server.key_updates_answered
    assert 5 <= len(answers_at) <= 5 + 2 * now + 1
    failure = failed(events)
    assert (failure.alert, failure.side) == (Alert.UNEXPECTED_MESSAGE, Side.LOCAL)


def test_a_slow_stream_of_requests_is_answered_every_time() -> None:
    client, server = pair(policy=KeyUpdatePolicy(rate=2.0, burst=5.0))
    for second in range(30):
        client.update_keys(request_peer=True)
        events = deliver(client, server, float(second))
        assert KeysUpdated("write") in events
        deliver(server, client)
    assert server.key_updates_answered == 30


def test_update_not_requested_is_never_answered() -> None:
    client, server = pair()
    for _ in range(500):
        client.update_keys()
    deliver(client, server)
    assert (server.key_updates_received, server.key_updates_answered) == (500, 0)
    assert server.data_to_send() == b""


def test_a_flood_of_unrequested_key_updates_ends_the_connection() -> None:
    client, server = pair(policy=KeyUpdatePolicy(any_rate=10.0, any_burst=50.0))
    for _ in range(51):
        client.update_keys()
    failure = failed(deliver(client, server))
    assert (failure.alert, failure.side) == (Alert.UNEXPECTED_MESSAGE, Side.LOCAL)
    assert server.key_updates_received == 50


@pytest.mark.parametrize("suite", sorted(CIPHER_SUITES))
def test_key_derivation_matches_tlslite(suite: int) -> None:
    spec = CIPHER_SUITES[suite]
    secret = Direction(spec, CLIENT_SECRET[: spec.digest_size])
    expected = HKDF_expand_label(
        bytearray(secret.secret), b"traffic upd", b"", spec.digest_size, spec.hash_name
    )
    assert secret.updated().secret == bytes(expected)
    key = HKDF_expand_label(bytearray(secret.secret), b"key", b"", spec.key_length, spec.hash_name)
    sealed = spec.aead(bytes(key)).encrypt(secret.keys.nonce(), b"x", b"")
    assert secret.keys.aead.decrypt(secret.keys.nonce(), sealed, b"") == b"x"
