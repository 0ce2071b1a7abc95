"""The record layer against a model of RFC 8446 5: random sequences of protected and forged
records, cut into reads at random offsets, must deliver exactly the authenticated
application bytes before the first record that ends the stream, in order, and nothing
after it; no buffer handed in or out is aliased (the data path opens records in place)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qkdproxy.core.tls.events import DataReceived, Failed, PeerClosed, RecordEvent, Side, Truncated
from qkdproxy.core.tls.record_layer import CIPHER_SUITES, Direction, Phase, RecordLayer
from qkdproxy.core.tls.records import HEADER, MAX_PLAINTEXT
from qkdproxy.core.tls.wire import Alert
from tests.unit.test_fuzz_parsers import fuzz_settings

SECRET = bytes(range(48))


@dataclass
class Outcome:
    """What the model says a receiver must report."""

    data: bytes = b""
    # None: the stream is still open at the end of the wire.
    end: str | None = None
    alert: int | None = None
    side: Side | None = None


class Peer:
    """A sender that builds any record, genuine or not, and the model of what it means."""

    def __init__(self, suite: int = 0x1302) -> None:
        self.suite = CIPHER_SUITES[suite]
        self.write = Direction(self.suite, SECRET)
        self.wire = bytearray()
        self.outcome = Outcome()
        self.last = b""

    def _seal(self, inner: bytes) -> bytes:
        header = HEADER.pack(0x17, 0x0303, len(inner) + 16)
        record = header + self.write.keys.aead.encrypt(self.write.keys.nonce(), inner, header)
        self.write.seqnum += 1
        return record

    def _end(self, end: str, alert: int | None = None, side: Side | None = None) -> None:
        if self.outcome.end is None:
            self.outcome.end, self.outcome.alert, self.outcome.side = end, alert, side

    def add(self, op: tuple[object, ...]) -> None:
        kind = op[0]
        open_ = self.outcome.end is None
        if kind == "data":
            payload, pad = op[1], op[2]
            assert isinstance(payload, bytes) and isinstance(pad, int)
            record = self._seal(payload + b"\x17" + bytes(pad))
            if len(payload) + 1 + pad > MAX_PLAINTEXT + 1:
                self._end("failed", Alert.RECORD_OVERFLOW, Side.LOCAL)
            elif open_:
                self.outcome.data += payload
        elif kind == "padding":
            record = self._seal(bytes(op[1]))  # type: ignore[call-overload]
            self._end("failed", Alert.UNEXPECTED_MESSAGE, Side.LOCAL)
        elif kind == "key_update":
            record = self._seal(bytes([24, 0, 0, 1, int(bool(op[1]))]) + b"\x16")
            self.write = self.write.updated()
        elif kind == "ticket":
            record = self._seal(bytes([4, 0, 0, 3, 1, 2, 3, 0x16]))
        elif kind == "user_canceled":
            record = self._seal(bytes([1, 90, 0x15]))
        elif kind == "close_notify":
            record = self._seal(bytes([1, 0, 0x15]))
            self._end("closed")
        elif kind == "fatal":
            record = self._seal(bytes([2, 40, 0x15]))
            self._end("failed", 40, Side.REMOTE)
        elif kind == "bad_tag":
            good = bytearray(self._seal(op[1] + b"\x17"))  # type: ignore[operator]
            self.write.seqnum -= 1  # the receiver never accepted it
            good[-1 - int(op[2]) % 16] ^= 0x40  # type: ignore[call-overload]
            record = bytes(good)
            self._end("failed", Alert.BAD_RECORD_MAC, Side.LOCAL)
        elif kind == "replay":
            record = self.last or bytes.fromhex("1703030011") + bytes(17)
            forged = record[0] != 0x17  # a replayed plaintext alert is refused as one
            alert = Alert.UNEXPECTED_MESSAGE if forged else Alert.BAD_RECORD_MAC
            self._end("failed", alert, Side.LOCAL)
        elif kind == "plaintext_alert":
            record = bytes([0x15, 3, 3, 0, 2, int(op[1]), 0])  # type: ignore[call-overload]
            self._end("failed", Alert.UNEXPECTED_MESSAGE, Side.LOCAL)
        else:
            raise AssertionError(kind)
        self.last = record
        self.wire += record


payloads = st.binary(max_size=40) | st.builds(lambda n: bytes([n % 251]) * n, st.integers(0, 3000))
ops = st.one_of(
    st.tuples(st.just("data"), payloads, st.sampled_from([0, 0, 0, 1, 7, 300])),
    st.tuples(st.just("data"), st.just(b"z" * MAX_PLAINTEXT), st.sampled_from([0, 1])),
    st.tuples(st.just("data"), st.just(b""), st.just(MAX_PLAINTEXT)),
    st.tuples(st.just("padding"), st.sampled_from([1, 2, 50])),
    st.tuples(st.just("key_update"), st.booleans()),
    st.tuples(st.just("ticket")),
    st.tuples(st.just("user_canceled")),
    st.tuples(st.just("close_notify")),
    st.tuples(st.just("fatal")),
    st.tuples(st.just("bad_tag"), payloads, st.integers(0, 15)),
    st.tuples(st.just("replay")),
    st.tuples(st.just("plaintext_alert"), st.sampled_from([1, 2])),
)


def run(
    peer: Peer, cuts: list[int], as_bytearray: list[bool]
) -> tuple[RecordLayer, list[bytes], list[RecordEvent]]:
    """Feed ``peer``'s wire cut at ``cuts``; scribble over every buffer after it changed
    hands."""
    suite, wire = peer.suite, bytes(peer.wire)
    layer = RecordLayer(Direction(suite, SECRET), Direction(suite, bytes(48)), is_client=True)
    bounds = [0, *sorted(set(cuts)), len(wire)]
    events: list[RecordEvent] = []
    delivered: list[bytes] = []
    for i, (start, end) in enumerate(itertools.pairwise(bounds)):
        chunk: bytes | bytearray = wire[start:end]
        if as_bytearray[i % len(as_bytearray)]:
            chunk = bytearray(chunk)
        # Every other reused buffer goes in as a view of it, as the socket reader's does.
        got = layer.receive(memoryview(chunk) if i % 2 else chunk, float(i))
        if isinstance(chunk, bytearray):
            chunk[:] = b"\xaa" * len(chunk)  # the transport reuses its buffer
        for event in got:
            if isinstance(event, DataReceived):
                delivered.append(bytes(event.data))
                if isinstance(event.data, bytearray):
                    event.data[:] = b"\x55" * len(event.data)  # the consumer owns it now
        events += got
    events += layer.receive_eof()
    return layer, delivered, events


def check(peer: Peer, cuts: list[int], as_bytearray: list[bool]) -> None:
    layer, delivered, events = run(peer, cuts, as_bytearray)
    expected = peer.outcome
    assert b"".join(delivered) == expected.data
    assert all(delivered), "DataReceived is never empty"
    ends = [e for e in events if isinstance(e, Failed | PeerClosed | Truncated)]
    assert len(ends) == 1, events
    assert ends[0] is events[-1] or not any(
        isinstance(e, DataReceived) for e in events[events.index(ends[0]) :]
    )
    end = ends[0]
    if expected.end is None:
        assert isinstance(end, Truncated)
    elif expected.end == "closed":
        assert isinstance(end, PeerClosed) and layer.phase is Phase.CLOSED
    else:
        assert isinstance(end, Failed), events
        assert (end.alert, end.side) == (expected.alert, expected.side)
    # Whatever arrives after the end is nobody's business.
    assert layer.receive(bytes(peer.wire), 99.0) == []


@fuzz_settings(400)
@given(
    sequence=st.lists(ops, min_size=1, max_size=12),
    trailer=st.booleans(),
    suite=st.sampled_from(sorted(CIPHER_SUITES)),
    data=st.data(),
)
def test_record_sequences_cut_anywhere_deliver_exactly_the_authenticated_prefix(
    sequence: list[tuple[object, ...]], trailer: bool, suite: int, data: st.DataObject
) -> None:
    peer = Peer(suite)
    for op in sequence:
        peer.add(op)
    if trailer:  # genuine data after whatever ended the stream must never surface
        peer.add(("data", b"trailer", 0))
    size = len(peer.wire)
    cuts = data.draw(st.lists(st.integers(0, size), max_size=8))
    as_bytearray = data.draw(st.lists(st.booleans(), min_size=1, max_size=4))
    check(peer, cuts, as_bytearray)


@pytest.mark.parametrize(
    "sequence",
    [
        [("data", b"a" * 100, 0), ("key_update", True), ("data", b"b" * 100, 3), ("close_notify",)],
        [("data", b"x" * 50, 0), ("data", b"", 0), ("padding", 2), ("data", b"late", 0)],
        [("data", b"m" * 60, 0), ("bad_tag", b"forged", 3), ("data", b"after", 0)],
        [("key_update", False), ("plaintext_alert", 1), ("data", b"after", 0)],
        [("data", b"d", 5), ("ticket",), ("user_canceled",), ("fatal",)],
    ],
    ids=["update-close", "padding-only", "bad-tag", "forged-close-at-0", "ticket-fatal"],
)
def test_every_single_and_double_cut(sequence: list[tuple[object, ...]]) -> None:
    peer = Peer()
    for op in sequence:
        peer.add(op)
    size = len(peer.wire)
    for first in range(size + 1):
        check(peer, [first], [first % 2 == 0, True])
    for first in range(0, size + 1, 7):
        for second in range(first, size + 1, 5):
            check(peer, [first, second], [False, True])


@pytest.mark.parametrize(
    ("header", "alert"),
    [
        (HEADER.pack(0x17, 0x0303, 0xFFFF), Alert.RECORD_OVERFLOW),
        (HEADER.pack(0x17, 0x0303, 16), Alert.BAD_RECORD_MAC),
        (HEADER.pack(0x15, 0x0303, 2), Alert.UNEXPECTED_MESSAGE),
        (HEADER.pack(0x16, 0x0303, 0xFFFF), Alert.UNEXPECTED_MESSAGE),
    ],
    ids=["oversized", "shorter-than-tag", "plaintext-alert", "plaintext-handshake"],
)
def test_a_hostile_header_cut_behind_a_genuine_tail_is_refused_at_once(
    header: bytes, alert: int
) -> None:
    # A genuine record cut in two, then a hostile header cut in two: each receive copies
    # only what completes the pending record, and the header is refused as soon as it is
    # whole, without waiting for (or buffering) the body it announces.
    peer = Peer()
    peer.add(("data", b"r" * 1000, 0))
    wire = bytes(peer.wire)
    layer = RecordLayer(
        Direction(peer.suite, SECRET), Direction(peer.suite, bytes(48)), is_client=True
    )
    assert layer.receive(memoryview(wire[:700]), 0.0) == []
    got = layer.receive(memoryview(wire[700:] + header[:3]), 1.0)
    assert [bytes(e.data) for e in got if isinstance(e, DataReceived)] == [b"r" * 1000]
    assert not any(isinstance(e, Failed) for e in got)
    failed = layer.receive(header[3:], 2.0)
    assert [(e.alert, e.side) for e in failed if isinstance(e, Failed)] == [(alert, Side.LOCAL)]
    assert layer.phase is Phase.FAILED
