"""The ledger that maps a dropped tail of ciphertext back to the application bytes it
carried (``core/tls/sent.py``), checked against records really sealed: the truth for a
cut is the application bytes of every record wholly before it."""

from __future__ import annotations

import itertools
import random

from qkdproxy.core.tls.records import (
    HEADER,
    MAX_PLAINTEXT,
    RECORD_OVERHEAD,
    record_step,
    seal,
    seal_inner,
)
from qkdproxy.core.tls.sent import Delivery, SentLedger
from qkdproxy.core.tls.wire import ContentType
from tests.unit.test_record_buffers import keys

DATA_FRAME = 0
FULL_RECORD = MAX_PLAINTEXT + RECORD_OVERHEAD


class Wire:
    """Writes batches of application records and records of other kinds, as a stream
    does, into a ledger; keeps every record's (end offset, application bytes) for the
    truth."""

    def __init__(self, ledger: SentLedger) -> None:
        self.ledger = ledger
        self.keys = keys()
        self.written = 0
        self.records: list[tuple[int, int]] = []

    def application(self, size: int, framed: bool = True, limit: int = MAX_PLAINTEXT) -> None:
        out = seal(self.keys, bytes(size), limit, DATA_FRAME if framed else None)
        step = record_step(limit, framed)
        at, left = 0, size
        while at < len(out):
            _, _, length = HEADER.unpack_from(out, at)
            at += HEADER.size + length
            self.records.append((self.written + at, min(step, left)))
            left -= min(step, left)
        self.written += len(out)
        self.ledger.sealed(self.written, size, step)

    def control(self, size: int = 5) -> None:
        """A record without application bytes (a KeyUpdate, a frame of our own)."""
        self.written += len(seal_inner(self.keys, bytes(size), ContentType.HANDSHAKE))
        self.records.append((self.written, 0))

    def truth(self, cut: int) -> int:
        return sum(payload for end, payload in self.records if end <= cut)

    def cuts(self) -> list[int]:
        """Every record boundary, a byte either side, and the ends of the wire."""
        ends = [end for end, _ in self.records]
        around = (c + d for c, d in itertools.product(ends, (-1, 0, 1)))
        return sorted({-5, 0, 1, *around, self.written + 3})


def test_an_empty_ledger_says_nothing_left_exactly() -> None:
    ledger = SentLedger(FULL_RECORD)
    for cut in (-100, 0, 1, 10**9):
        assert ledger.delivered(cut) == Delivery(0, True)


def test_records_without_application_bytes_alone_count_nothing() -> None:
    wire = Wire(SentLedger(FULL_RECORD))
    wire.control()
    wire.control(40)
    for cut in wire.cuts():
        assert wire.ledger.delivered(cut) == Delivery(0, True)


def test_a_record_partly_sent_does_not_count() -> None:
    """One batch of three records (16,380 + 16,380 + 7,240 application bytes, framed): a
    record counts from its last byte on, never before."""
    wire = Wire(SentLedger(FULL_RECORD))
    wire.application(40_000)
    first, second, third = (end for end, _ in wire.records)
    assert wire.ledger.delivered(first - 1) == Delivery(0, True)
    assert wire.ledger.delivered(first) == Delivery(16_380, True)
    assert wire.ledger.delivered(second - 1) == Delivery(16_380, True)
    assert wire.ledger.delivered(second) == Delivery(32_760, True)
    assert wire.ledger.delivered(third - 1) == Delivery(32_760, True)
    assert wire.ledger.delivered(third) == Delivery(40_000, True)


def test_every_cut_maps_exactly_across_batches_framings_and_other_records() -> None:
    """Batches of many sizes (around the record and the frame), framed and not, a smaller
    record limit (record_size_limit), and records of other kinds in between: every cut
    gives exactly the application bytes of the records wholly before it."""
    wire = Wire(SentLedger(FULL_RECORD))
    for size in (1, 16_379, 16_380, 16_381, 16_384, 16_385, 262_144, 100, 70_000):
        wire.application(size)
        wire.control()
    wire.application(50_000, framed=False)
    wire.application(16_384, framed=False)
    limited = Wire(SentLedger(1_000 + RECORD_OVERHEAD))
    limited.application(10_000, limit=1_000)
    limited.control()
    limited.application(3_333, limit=1_000)
    for each in (wire, limited):
        for cut in each.cuts():
            assert each.ledger.delivered(cut) == Delivery(each.truth(cut), True), cut


def test_a_cut_beyond_what_the_ledger_covers_gets_a_lower_bound_said_to_be_one() -> None:
    """A ledger bounded to a few batches (by count, then by bytes): a cut within what it
    remembers is exact; one before it is a lower bound, never above the truth, and said
    to be one."""
    rng = random.Random(7)
    for ledger in (SentLedger(FULL_RECORD, entries=3), SentLedger(FULL_RECORD, span=100_000)):
        wire = Wire(ledger)
        for _ in range(12):
            wire.application(rng.randrange(1, 80_000))
            if rng.random() < 0.5:
                wire.control()
        inexact = 0
        for cut in wire.cuts():
            got = ledger.delivered(cut)
            if got.exact:
                assert got.count == wire.truth(cut), cut
            else:
                inexact += 1
                assert got.count <= wire.truth(cut), cut
        assert inexact, "no cut reached beyond the ledger"
        # The most recent batches stay exact: a reset drops a tail.
        last_batch_start = wire.records[-1][0] - 80_000
        assert ledger.delivered(max(0, last_batch_start)).exact


def test_the_ledger_stays_bounded() -> None:
    ledger = SentLedger(FULL_RECORD, entries=4)
    wire = Wire(ledger)
    for _ in range(50):
        wire.application(1)
    assert len(ledger._batches) == 4
    assert ledger.delivered(wire.written) == Delivery(50, True)
