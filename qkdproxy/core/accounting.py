"""Where every QKD key went: consumed by a handshake, or wasted; and a replay guard.

Two views. :class:`KeyLedger` (per tunnel) follows the keys handshakes held. :class:`KeyAccount`
(per KME section) follows every key drawn from the KME, whether a handshake, a supply held
ahead or an announced-key cache drew it, to exactly one fate, so that at any moment
``drawn == sum(fates) + held``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

# Every fate a drawn key can end in (the label values of qkdproxy_qkd_key_fates).
FATES = (
    "consumed", "failed_handshake", "hello_retry", "expired", "flushed", "stranded",
    "refused", "failed_update",
)  # fmt: skip
# KeyLedger's waste reasons as KeyAccount fates (an Extended Key Update's keys: failed_update).
_LEDGER_FATES = {
    "handshake_failed": "failed_handshake", "hello_retry": "hello_retry",
    "update_failed": "failed_update", "update_crossed": "failed_update",
    "update_superseded": "failed_update", "update_abandoned": "failed_update",
}  # fmt: skip


@dataclass(slots=True)
class KeyAccount:
    """Every key drawn from one KME section, by fate."""

    drawn: int = 0
    fates: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FATES, 0))

    def draw(self, count: int = 1) -> None:
        """``count`` keys arrived from the KME."""
        self.drawn += count

    def settle(self, fate: str, count: int = 1) -> None:
        """``count`` drawn keys reached ``fate`` (one of :data:`FATES`)."""
        self.fates[fate] += count

    @property
    def held(self) -> int:
        """Drawn keys without a fate yet: in a supply, a cache or a handshake."""
        return self.drawn - sum(self.fates.values())

    @property
    def key_yield(self) -> float | None:
        """Consumed over settled (None before any key was settled)."""
        settled = sum(self.fates.values())
        return self.fates["consumed"] / settled if settled else None


@dataclass(slots=True)
class KeyLedger:
    """Counts keys by fate. Every key taken ends as exactly one of consumed or wasted.

    ``account``, when given, is told each fate too (the KME section's :class:`KeyAccount`).
    """

    taken: int = 0
    consumed: int = 0
    wasted: int = 0
    wasted_by_reason: dict[str, int] = field(default_factory=dict)
    account: KeyAccount | None = None

    def record_taken(self) -> None:
        """A key left the key source for this endpoint."""
        self.taken += 1

    def record_consumed(self) -> None:
        """A key fed the secret of a completed handshake."""
        self.consumed += 1
        if self.account is not None:
            self.account.settle("consumed")

    def record_wasted(self, reason: str) -> None:
        """A key was dropped unused (failed handshake, HelloRetryRequest, other group)."""
        self.wasted += 1
        self.wasted_by_reason[reason] = self.wasted_by_reason.get(reason, 0) + 1
        if self.account is not None:
            self.account.settle(_LEDGER_FATES.get(reason, "failed_handshake"))

    def reclassify_refused(self) -> None:
        """The last failed handshake's key was refused by the peer (not merely failed)."""
        if self.account is not None and self.account.fates["failed_handshake"]:
            self.account.fates["failed_handshake"] -= 1
            self.account.fates["refused"] += 1

    @property
    def outstanding(self) -> int:
        """Keys held by handshakes still in progress."""
        return self.taken - self.consumed - self.wasted


class KeyIdGuard:
    """Remembers the most recent key ids seen, so a replayed ClientHello is refused locally.

    The KME already refuses a second delivery of a key; this guard answers a replay without
    a KME call at all. It is bounded: the oldest ids are forgotten first.
    """

    def __init__(self, capacity: int = 65536) -> None:
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._capacity = capacity

    def claim(self, key_id: bytes) -> bool:
        """Record ``key_id``; False if it was already claimed."""
        key_id = bytes(key_id)
        if key_id in self._seen:
            return False
        self._seen[key_id] = None
        if len(self._seen) > self._capacity:
            self._seen.popitem(last=False)
        return True
