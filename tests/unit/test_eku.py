"""Extended Key Update between two sans-I/O connections joined in memory: a hand-driven
clock, key requests answered by the in-memory KME of the connection tests."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qkdproxy.core.hybrid import attach_key_id
from qkdproxy.core.keys import KeySourceUnavailableError, key_id_from_text
from qkdproxy.core.tls import eku
from qkdproxy.core.tls.connection import ConnectionConfig, HandshakeComplete, Phase
from qkdproxy.core.tls.eku_state import State
from qkdproxy.core.tls.events import (
    DataReceived,
    Failed,
    FreshKeysInstalled,
    RecordEvent,
    Side,
    UpdateKeyNeeded,
)
from qkdproxy.core.tls.keyexchange import (
    CloseStream,
    ExchangeContext,
    Flow,
    KeyApi,
    KeySteps,
    QkdOptions,
)
from qkdproxy.core.tls.record_layer import RecordLayer
from qkdproxy.core.tls.records import seal_inner
from qkdproxy.core.tls.wire import Alert, ContentType
from qkdproxy.sim.pki import CertificateAuthority
from tests.conftest import groups
from tests.unit.test_connection import Kme, Pair, pair

QKD_GROUP = "qkd_mlkem768"


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create()


def connected(
    ca: CertificateAuthority,
    *,
    group: str = QKD_GROUP,
    client_offers: bool = True,
    server_offers: bool = True,
    options: QkdOptions | None = None,
    require: bool = False,
) -> tuple[Pair, ExchangeContext, ExchangeContext]:
    def configure(config: ConnectionConfig, client: bool) -> ConnectionConfig:
        offers = client_offers if client else server_offers
        return dataclasses.replace(
            config, fresh_key_update=offers, require_fresh_key_update=require
        )

    p = pair(ca, groups(group), options=options, server_options=options, configure=configure)
    return p, p.client.keys, p.server.keys


@dataclass
class Link:
    """Two record layers joined by hand: bytes move only when :meth:`pump` says so."""

    client: RecordLayer
    server: RecordLayer
    kme: Kme
    now: float = 0.0
    received: dict[str, bytearray] = field(
        default_factory=lambda: {"client": bytearray(), "server": bytearray()}
    )
    events: dict[str, list[RecordEvent]] = field(
        default_factory=lambda: {"client": [], "server": []}
    )
    held: dict[str, list[UpdateKeyNeeded]] = field(
        default_factory=lambda: {"client": [], "server": []}
    )
    answer_keys: bool = True

    def layer(self, name: str) -> RecordLayer:
        return self.client if name == "client" else self.server

    def handle(self, name: str, events: list[RecordEvent]) -> None:
        for event in events:
            self.events[name].append(event)
            if isinstance(event, DataReceived):
                self.received[name] += event.data
            elif isinstance(event, UpdateKeyNeeded) and not isinstance(event.request, CloseStream):
                if self.answer_keys:
                    self.answer(name, event)
                else:
                    self.held[name].append(event)

    def answer(self, name: str, event: UpdateKeyNeeded) -> None:
        more = self.layer(name).answer_update_key(self.kme.answer(event.request), self.now)
        self.handle(name, more)

    def release(self) -> None:
        """Answer the key requests held back."""
        for name in ("client", "server"):
            held, self.held[name] = self.held[name], []
            for event in held:
                self.answer(name, event)

    def deliver(self, name: str) -> bool:
        """Move what ``name`` queued to its peer; True if anything moved."""
        data = self.layer(name).data_to_send()
        if not data:
            return False
        peer = "server" if name == "client" else "client"
        self.handle(peer, self.layer(peer).receive(data, self.now))
        return True

    def pump(self, rounds: int = 50) -> None:
        for _ in range(rounds):
            moved = self.deliver("client")
            moved = self.deliver("server") or moved
            if not moved:
                return
        raise AssertionError("never settled")

    def initiate(self, name: str) -> None:
        """Start an update from ``name``: prepare its share (key from the KME), send it."""
        prepared = self.layer(name).prepare_fresh_update()
        assert prepared is not None
        kex, steps = prepared
        run_sync(steps, self.kme)
        self.handle(name, self.layer(name).begin_fresh_update(kex, self.now))

    def of(self, name: str, kind: type) -> list[object]:
        return [e for e in self.events[name] if isinstance(e, kind)]


def run_sync(steps: KeySteps[None], kme: Kme) -> None:
    answer = None
    try:
        while True:
            request = steps.steps.send(answer)
            answer = kme.answer(request)
    except StopIteration:
        return


def link(p: Pair) -> Link:
    assert p.client.records is not None and p.server.records is not None
    return Link(p.client.records, p.server.records, p.kme)


def key_ids(lnk: Link, name: str) -> list[str | None]:
    return [e.key_id for e in lnk.of(name, FreshKeysInstalled)]  # type: ignore[attr-defined]


# ------------------------------------------------------------------ negotiation


@pytest.mark.parametrize(("client", "server"), [(True, False), (False, True), (False, False)])
def test_eku_is_negotiated_only_when_both_offer_it(
    ca: CertificateAuthority, client: bool, server: bool
) -> None:
    p, _, _ = connected(ca, client_offers=client, server_offers=server)
    assert p.client.phase is p.server.phase is Phase.ESTABLISHED
    assert p.client.records is not None and p.server.records is not None
    assert p.client.records.eku is None and p.server.records.eku is None
    assert p.client.records.prepare_fresh_update() is None


def test_require_refuses_a_peer_that_does_not_offer_it(ca: CertificateAuthority) -> None:
    p, _, _ = connected(ca, client_offers=True, server_offers=False, require=True)
    assert p.client.phase is not Phase.ESTABLISHED or p.server.phase is not Phase.ESTABLISHED
    assert not (p.of("client", HandshakeComplete) and p.of("server", HandshakeComplete))


# ------------------------------------------------------------------ updates


@pytest.mark.parametrize("initiator", ["client", "server"])
@pytest.mark.parametrize("flow", list(Flow))
def test_an_update_spends_one_fresh_qkd_key_and_keeps_data_flowing(
    ca: CertificateAuthority, initiator: str, flow: Flow
) -> None:
    p, client_keys, server_keys = connected(ca, options=QkdOptions(flow=flow))
    lnk = link(p)
    handshake_ids = {e.record.qkd_key_id for e in p.of("client", HandshakeComplete)}  # type: ignore[attr-defined]
    for round_ in range(3):
        lnk.initiate(initiator)
        lnk.client.send_data(b"c%d" % round_)
        lnk.server.send_data(b"s%d" % round_)
        lnk.pump()
    assert bytes(lnk.received["server"]) == b"c0c1c2"
    assert bytes(lnk.received["client"]) == b"s0s1s2"
    ids = key_ids(lnk, "client")
    assert ids == key_ids(lnk, "server")
    assert len(ids) == 3 and len(set(ids)) == 3
    assert None not in ids
    assert handshake_ids and not handshake_ids & set(ids)
    assert len(p.kme.keys) == 4  # one for the handshake, one per update
    for keys in (client_keys, server_keys):
        assert keys.ledger.outstanding == 0
    assert lnk.client.eku is not None and lnk.client.eku.stats.completed == 3


def test_a_pq_only_group_updates_without_a_kme(ca: CertificateAuthority) -> None:
    p, _, _ = connected(ca, group="X25519MLKEM768")
    lnk = link(p)
    lnk.initiate("client")
    lnk.pump()
    assert key_ids(lnk, "server") == [None]
    assert not p.kme.asked


def test_old_keys_no_longer_open_records_after_an_update(ca: CertificateAuthority) -> None:
    p, _, _ = connected(ca)
    lnk = link(p)
    old_write = lnk.client.write
    lnk.initiate("client")
    lnk.pump()
    stale = seal_inner(old_write.keys, b"late", ContentType.APPLICATION_DATA)
    events = lnk.server.receive(stale, lnk.now)
    assert any(isinstance(e, Failed) and e.alert == Alert.BAD_RECORD_MAC for e in events)


def test_crossing_requests_resolve_to_one_update(ca: CertificateAuthority) -> None:
    p, client_keys, server_keys = connected(ca)
    lnk = link(p)
    lnk.initiate("client")
    lnk.initiate("server")  # both requests in flight
    lnk.client.send_data(b"a")
    lnk.server.send_data(b"b")
    lnk.pump()
    assert len(key_ids(lnk, "client")) == len(key_ids(lnk, "server")) == 1
    assert bytes(lnk.received["server"]) == b"a" and bytes(lnk.received["client"]) == b"b"
    assert lnk.client.eku is not None and lnk.server.eku is not None
    assert lnk.client.eku.stats.ignored_crossing == lnk.server.eku.stats.ignored_crossing == 1
    # The ignored request's key (only the originating client's request holds one) is
    # counted as wasted, never used.
    total_wasted = sum(k.ledger.wasted for k in (client_keys, server_keys))
    assert total_wasted == len(p.kme.keys) - 2
    assert set(client_keys.ledger.wasted_by_reason) <= {"update_crossed"}
    for keys in (client_keys, server_keys):
        assert keys.ledger.outstanding == 0
    # And the connection goes on updating.
    lnk.initiate("server")
    lnk.pump()
    assert len(key_ids(lnk, "client")) == 2


def test_data_keeps_flowing_while_the_responder_waits_for_its_key(
    ca: CertificateAuthority,
) -> None:
    p, _, _ = connected(ca)
    lnk = link(p)
    lnk.answer_keys = False
    lnk.initiate("client")  # the initiator's key came at once (supply)
    lnk.pump()
    assert lnk.held["server"]  # the responder's dec_keys waits
    # The responder still sends under its old keys; the initiator still reads them.
    lnk.server.send_data(b"during")
    lnk.client.send_data(b"queued")
    lnk.pump()
    assert bytes(lnk.received["client"]) == b"during"
    lnk.release()
    lnk.answer_keys = True
    lnk.pump()
    assert bytes(lnk.received["server"]) == b"queued"
    assert len(key_ids(lnk, "server")) == 1


def test_a_large_transfer_across_updates_arrives_whole_and_in_order(
    ca: CertificateAuthority,
) -> None:
    p, _, _ = connected(ca)
    lnk = link(p)
    sent = {"client": hashlib.sha256(), "server": hashlib.sha256()}
    for i in range(40):
        for name in ("client", "server"):
            chunk = os.urandom(50_000 + i)
            sent[name].update(chunk)
            lnk.layer(name).send_data(chunk)
        if i % 8 == 3:
            lnk.initiate("client" if i % 16 == 3 else "server")
        if i % 3 == 0:
            lnk.pump()
    lnk.pump()
    assert hashlib.sha256(lnk.received["server"]).digest() == sent["client"].digest()
    assert hashlib.sha256(lnk.received["client"]).digest() == sent["server"].digest()
    assert len(key_ids(lnk, "client")) == 5


# ------------------------------------------------------------------ refusals


def inject(lnk: Link, sender: str, message: bytes) -> list[RecordEvent]:
    """Deliver a hand-made handshake message from ``sender`` under its current keys."""
    layer = lnk.layer(sender)
    layer.send_handshake(message)
    receiver = "server" if sender == "client" else "client"
    events = lnk.layer(receiver).receive(layer.data_to_send(), lnk.now)
    lnk.handle(receiver, events)
    return events


def refused_with(events: list[RecordEvent]) -> int | None:
    failed = [e for e in events if isinstance(e, Failed)]
    assert failed and failed[0].side is Side.LOCAL, events
    return failed[0].alert


@pytest.mark.parametrize(
    ("body", "alert"),
    [
        (bytes([eku.KEY_UPDATE_RESPONSE]) + b"\x00\x1d\x00\x01x", Alert.UNEXPECTED_MESSAGE),
        (bytes([eku.NEW_KEY_UPDATE]), Alert.UNEXPECTED_MESSAGE),
        (bytes([7]), Alert.UNEXPECTED_MESSAGE),
        (b"", Alert.DECODE_ERROR),
        (bytes([eku.KEY_UPDATE_REQUEST, 0]), Alert.DECODE_ERROR),
        (bytes([eku.KEY_UPDATE_REQUEST]) + b"\x00\x1d\x00\x05abc", Alert.DECODE_ERROR),
        (bytes([eku.NEW_KEY_UPDATE, 0]), Alert.DECODE_ERROR),
        (bytes([eku.KEY_UPDATE_REQUEST]) + b"\x00\x1d\x00\x03abc", Alert.ILLEGAL_PARAMETER),
    ],
)
def test_malformed_or_unexpected_messages_get_their_alert(
    ca: CertificateAuthority, body: bytes, alert: Alert
) -> None:
    p, _, server_keys = connected(ca)
    lnk = link(p)
    message = bytes([eku.EXTENDED_KEY_UPDATE]) + len(body).to_bytes(3, "big") + body
    assert refused_with(inject(lnk, "client", message)) == alert
    assert server_keys.ledger.outstanding == 0


def test_a_request_with_a_bad_share_fails_before_any_kme_call(ca: CertificateAuthority) -> None:
    p, _, server_keys = connected(ca)
    lnk = link(p)
    assert lnk.server.eku is not None
    asked = len(p.kme.asked)
    bad = eku.encode(eku.KEY_UPDATE_REQUEST, lnk.server.eku.group, b"\x01" * 10)
    assert refused_with(inject(lnk, "client", bad)) == Alert.ILLEGAL_PARAMETER
    assert len(p.kme.asked) == asked
    assert server_keys.ledger.outstanding == 0


def test_an_eku_message_without_negotiation_is_unexpected(ca: CertificateAuthority) -> None:
    p, _, _ = connected(ca, server_offers=False)
    lnk = link(p)
    message = eku.encode(eku.KEY_UPDATE_REQUEST, 0x0201, b"\x01" * 32)
    assert refused_with(inject(lnk, "client", message)) == Alert.UNEXPECTED_MESSAGE


def test_a_request_replaying_the_handshake_key_id_costs_no_kme_call(
    ca: CertificateAuthority,
) -> None:
    p, _, server_keys = connected(ca)
    lnk = link(p)
    assert lnk.server.eku is not None
    (done,) = p.of("server", HandshakeComplete)
    used = key_id_from_text(done.record.qkd_key_id)  # type: ignore[attr-defined]
    _, public = groups(QKD_GROUP)[0].generate()
    replay = eku.encode(eku.KEY_UPDATE_REQUEST, lnk.server.eku.group, attach_key_id(public, used))
    asked = len(p.kme.asked)
    assert refused_with(inject(lnk, "client", replay)) == Alert.ILLEGAL_PARAMETER
    assert len(p.kme.asked) == asked
    assert server_keys.ledger.outstanding == 0


def test_a_second_request_during_an_update_is_refused(ca: CertificateAuthority) -> None:
    p, _, server_keys = connected(ca)
    lnk = link(p)
    lnk.answer_keys = False
    lnk.initiate("client")
    lnk.pump()  # the server waits for its key
    lnk.release()  # answered: the response is queued, the server waits for new_key_update
    assert lnk.server.eku is not None and lnk.server.eku.state is State.AWAIT_NKU
    lnk.server.data_to_send()  # the response never reaches the client
    prepared = lnk.client.eku
    assert prepared is not None
    again = eku.encode(eku.KEY_UPDATE_REQUEST, prepared.group, b"\x02" * 40)
    assert refused_with(inject(lnk, "client", again)) == Alert.UNEXPECTED_MESSAGE
    # The key the server held for the unfinished update is wasted and counted.
    assert server_keys.ledger.outstanding == 0
    assert server_keys.ledger.wasted == 1


def test_an_unknown_key_id_in_a_request_fails_the_connection_closed(
    ca: CertificateAuthority,
) -> None:
    p, client_keys, server_keys = connected(ca)
    lnk = link(p)
    p.kme.unknown_ids = True
    lnk.initiate("client")
    lnk.pump()
    assert refused_with(lnk.events["server"]) == Alert.ILLEGAL_PARAMETER
    assert any(isinstance(e, Failed) and e.side is Side.REMOTE for e in lnk.events["client"])
    for keys in (client_keys, server_keys):
        assert keys.ledger.outstanding == 0
    assert client_keys.ledger.wasted == 1


def test_a_kme_failure_during_an_update_is_ours_and_fails_closed(
    ca: CertificateAuthority,
) -> None:
    p, _, _ = connected(ca)
    lnk = link(p)
    lnk.initiate("client")
    p.kme.failing = KeySourceUnavailableError
    lnk.pump()
    assert refused_with(lnk.events["server"]) == Alert.INTERNAL_ERROR
    assert lnk.server.phase.value == "failed"


def test_a_request_flood_is_refused(ca: CertificateAuthority) -> None:
    p, _, _ = connected(ca)
    lnk = link(p)
    for _ in range(10):
        lnk.initiate("client")
        lnk.pump()
    assert len(key_ids(lnk, "server")) == 10
    lnk.initiate("client")
    lnk.pump()
    assert refused_with(lnk.events["server"]) == Alert.UNEXPECTED_MESSAGE


def test_an_update_is_not_sent_after_the_stream_ended(ca: CertificateAuthority) -> None:
    p, client_keys, _ = connected(ca)
    lnk = link(p)
    prepared = lnk.client.prepare_fresh_update()
    assert prepared is not None
    kex, steps = prepared
    run_sync(steps, p.kme)
    lnk.client.close()
    assert lnk.client.begin_fresh_update(kex, lnk.now) == []
    assert client_keys.ledger.outstanding == 0


def deadline_failure(layer: RecordLayer, now: float) -> Failed | None:
    events = layer.check_fresh_update(now)
    failed = [e for e in events if isinstance(e, Failed)]
    return failed[0] if failed else None


def test_an_update_the_peer_never_answers_fails_the_connection_at_its_deadline(
    ca: CertificateAuthority,
) -> None:
    """A hostile or stuck peer that never sends key_update_response must not leave the
    connection on its old keys for ever (that would silently defeat the fresh-key policy)."""
    p, client_keys, _ = connected(ca)
    lnk = link(p)
    lnk.initiate("client")
    lnk.client.data_to_send()  # the request is lost: the peer never sees it
    eku_ = lnk.client.eku
    assert eku_ is not None and eku_.state is State.AWAIT_RESPONSE
    assert deadline_failure(lnk.client, lnk.now + eku_.deadline_s) is None  # still in time
    failure = deadline_failure(lnk.client, lnk.now + eku_.deadline_s + 0.1)
    assert failure is not None and failure.alert == Alert.HANDSHAKE_FAILURE
    assert "not finished within" in failure.reason
    assert lnk.client.phase.value == "failed"
    assert (eku_.stats.failed, eku_.stats.completed, eku_.state) == (1, 0, State.IDLE)
    assert client_keys.ledger.outstanding == 0 and client_keys.ledger.wasted == 1
    assert lnk.client.check_fresh_update(lnk.now + 100) == []  # once


def test_a_peer_that_never_sends_new_key_update_fails_the_responder_at_its_deadline(
    ca: CertificateAuthority,
) -> None:
    p, _, server_keys = connected(ca)
    lnk = link(p)
    lnk.initiate("client")
    lnk.deliver("client")  # the server answers, then waits for new_key_update
    lnk.server.data_to_send()  # which never comes: its response is lost
    eku_ = lnk.server.eku
    assert eku_ is not None and eku_.state is State.AWAIT_NKU
    failure = deadline_failure(lnk.server, lnk.now + eku_.deadline_s + 0.1)
    assert failure is not None and eku_.stats.failed == 1
    assert server_keys.ledger.outstanding == 0


@pytest.mark.parametrize("flow", list(Flow))
def test_a_key_that_arrives_after_the_deadline_failed_its_update_is_counted(
    ca: CertificateAuthority, flow: Flow
) -> None:
    """The responder's KME call outlives the update's deadline (slow within its own
    timeout): the key it then delivers was taken all the same (dec_keys, or enc_keys from
    our supply when the peer does not originate) and must show in the ledger as wasted,
    not vanish."""
    p, _, server_keys = connected(ca, options=QkdOptions(flow=flow))
    lnk = link(p)
    lnk.answer_keys = False
    lnk.initiate("client")
    lnk.pump()
    assert lnk.held["server"]  # the responder's key call waits
    eku_ = lnk.server.eku
    assert eku_ is not None
    assert deadline_failure(lnk.server, lnk.now + eku_.deadline_s + 1) is not None
    taken = server_keys.ledger.taken
    lnk.release()  # the KME answers late: the key was delivered all the same
    assert server_keys.ledger.taken == taken + 1
    assert server_keys.ledger.outstanding == 0
    assert server_keys.ledger.wasted_by_reason == {"update_failed": 1}


def test_time_this_side_held_the_update_up_does_not_count(ca: CertificateAuthority) -> None:
    """Flow control is not a refusal: while our reader is slow or our writes wait for the
    peer, the deadline's clock stops; it runs on when we are ready again."""
    p, _, _ = connected(ca)
    lnk = link(p)
    lnk.initiate("client")
    lnk.client.data_to_send()
    eku_ = lnk.client.eku
    assert eku_ is not None
    limit = eku_.deadline_s
    assert lnk.client.check_fresh_update(lnk.now + 0.5 * limit) == []
    assert lnk.client.check_fresh_update(lnk.now + 100 * limit, held=True) == []
    assert lnk.client.check_fresh_update(lnk.now + 100.4 * limit) == []  # 0.9 of it ran
    assert deadline_failure(lnk.client, lnk.now + 100.6 * limit) is not None


def test_no_deadline_runs_between_updates(ca: CertificateAuthority) -> None:
    p, _, _ = connected(ca)
    lnk = link(p)
    lnk.initiate("client")
    lnk.pump()
    assert lnk.client.check_fresh_update(lnk.now + 1e6) == []
    assert lnk.server.check_fresh_update(lnk.now + 1e6) == []


def test_a_clean_close_during_an_update_is_not_a_failure(ca: CertificateAuthority) -> None:
    """An update cut short by close_notify wastes its key (counted) but did not fail."""
    p, client_keys, _ = connected(ca)
    lnk = link(p)
    lnk.initiate("client")
    lnk.client.data_to_send()  # the request never arrives
    lnk.server.close()
    lnk.deliver("server")
    eku_ = lnk.client.eku
    assert eku_ is not None
    assert (eku_.stats.failed, eku_.stats.abandoned) == (0, 1)
    assert client_keys.ledger.outstanding == 0 and client_keys.ledger.wasted == 1


def test_etsi_004_updates_open_a_stream_each(ca: CertificateAuthority) -> None:
    p, client_keys, server_keys = connected(ca, options=QkdOptions(api=KeyApi.ETSI_004))
    lnk = link(p)
    before = len(p.kme.streams)
    lnk.initiate("client")
    lnk.pump()
    assert len(p.kme.streams) == before + 1
    assert len(key_ids(lnk, "server")) == 1
    for keys in (client_keys, server_keys):
        assert keys.ledger.outstanding == 0


# ------------------------------------------------------------------ property


def _schedule(draw_ops: list[tuple[str, str]], lnk: Link) -> Iterator[None]:
    for op, who in draw_ops:
        if op == "update":
            layer = lnk.layer(who)
            if layer.prepare_fresh_update() is not None:
                lnk.initiate(who)
        elif op == "data":
            lnk.layer(who).send_data(os.urandom(100))
        else:
            lnk.deliver(who)
        yield


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["update", "data", "deliver"]), st.sampled_from(["client", "server"])
        ),
        max_size=30,
    ),
    flow=st.sampled_from(list(Flow)),
)
def test_no_qkd_key_is_ever_used_twice_across_handshakes_and_updates(
    ca: CertificateAuthority, ops: list[tuple[str, str]], flow: Flow
) -> None:
    p, client_keys, server_keys = connected(ca, options=QkdOptions(flow=flow))
    lnk = link(p)
    handshake_ids = [e.record.qkd_key_id for e in p.of("client", HandshakeComplete)]  # type: ignore[attr-defined]
    for _ in _schedule(ops, lnk):
        pass
    lnk.pump()
    assert lnk.client.phase.value == lnk.server.phase.value == "open"
    ids = handshake_ids + key_ids(lnk, "client")
    assert len(ids) == len(set(ids))
    assert key_ids(lnk, "client") == key_ids(lnk, "server")
    # Every key any side took is consumed or wasted, and a taken key feeds at most one update.
    for keys in (client_keys, server_keys):
        assert keys.ledger.outstanding == 0
    assert len(p.kme.keys) >= len(ids)
