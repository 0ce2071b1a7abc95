"""Which application bytes left before a reset (no I/O).

A reset of a TLS connection drops what our side still held for the peer: the tail of the
ciphertext written, from some offset on. Records are sealed in order, so that tail maps
back to application bytes exactly, given where each recent batch of records ended and
how it was cut into records. :class:`SentLedger` keeps that for the batches that can
still be queued, bounded by bytes and by batches, so a connection pays one append per
batch of records (up to 16 records) and holds a few kilobytes at most.

A record counts only once the whole of it left: the peer cannot open a part of one.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

# Ciphertext a reset can drop at most, as the ledger assumes: a transport's buffer plus a
# socket's send queue (Linux allows 4 MiB by default, tcp_wmem; raised, it can be more).
SPAN = 16 << 20
# Batches remembered at most: 16 MiB of 256 KiB batches (the pump's reads) with room to
# spare; smaller writes cover less, and a reset that drops more than the ledger covers
# gets a lower bound (Delivery.exact is False).
ENTRIES = 128


@dataclass(frozen=True, slots=True)
class Delivery:
    """What left of the application bytes: ``count``, exactly or (``exact`` False) at
    least."""

    count: int
    exact: bool


class SentLedger:
    """The recent batches of application records of one connection's sending side.

    Offsets count every byte of ciphertext written to the transport since the ledger
    began (records of other kinds too: KeyUpdates, alerts, frames that carry no
    application bytes), so the caller passes each batch's end offset as it hands the
    batch over. ``record`` is the ciphertext size of a full record (its plaintext limit
    plus the record's overhead, whatever the framing).
    """

    __slots__ = ("_base", "_batches", "_entries", "_record", "_span")

    def __init__(self, record: int, *, span: int = SPAN, entries: int = ENTRIES) -> None:
        self._record = record
        self._span = span
        self._entries = entries
        # (ciphertext end offset, application bytes up to and with the batch, application
        # bytes per full record), oldest first.
        self._batches: deque[tuple[int, int, int]] = deque()
        # The same two totals of the newest batch forgotten ((0, 0): none yet).
        self._base = (0, 0)

    def sealed(self, end: int, payload: int, step: int) -> None:
        """A batch of ``payload`` application bytes went to the transport, sealed in records
        of ``step`` of them each (the last one holding the rest); its last byte of
        ciphertext is at offset ``end`` - 1."""
        batches = self._batches
        total = (batches[-1][1] if batches else self._base[1]) + payload
        batches.append((end, total, step))
        # Forget what no reset can reach any more: ends a span behind, or the oldest beyond
        # the count (then a reset that reaches further gets a lower bound).
        while len(batches) > self._entries or batches[0][0] <= end - self._span:
            oldest = batches.popleft()
            self._base = (oldest[0], oldest[1])

    def delivered(self, cut: int) -> Delivery:
        """The application bytes whose records lie wholly before ciphertext offset ``cut``
        (what remained from ``cut`` on was dropped).

        A cut before what the ledger remembers gets a lower bound: every byte of ciphertext
        between the cut and the oldest batch remembered is taken for an application byte
        lost (none carries more than one), and so is a whole record more (the one the cut
        fell into, lost with its bytes before the cut).
        """
        base_end, base_total = self._base
        if cut < base_end and base_total:  # (with none forgotten, nothing comes before)
            return Delivery(max(0, base_total - (base_end - cut) - self._record), False)
        before = base_total
        for end, total, step in self._batches:
            if cut >= end:
                before = total
                continue
            payload = total - before
            records = -(-payload // step)
            # Every record is full but the last; the ciphertext a record adds is the same.
            size = payload + records * (self._record - step)
            into = cut - (end - size)
            if into <= 0:
                return Delivery(before, True)
            return Delivery(before + min(payload, into // self._record * step), True)
        return Delivery(before, True)
