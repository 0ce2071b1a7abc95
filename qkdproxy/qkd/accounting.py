"""Where every QKD key went: consumed by a handshake, or wasted; and a replay guard."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass(slots=True)
class KeyLedger:
    """Counts keys by fate. Every key taken ends as exactly one of consumed or wasted."""

    taken: int = 0
    consumed: int = 0
    wasted: int = 0
    wasted_by_reason: dict[str, int] = field(default_factory=dict)

    def record_taken(self) -> None:
        """A key left the key source for this endpoint."""
        self.taken += 1

    def record_consumed(self) -> None:
        """A key fed the secret of a completed handshake."""
        self.consumed += 1

    def record_wasted(self, reason: str) -> None:
        """A key was dropped unused (failed handshake, HelloRetryRequest, other group)."""
        self.wasted += 1
        self.wasted_by_reason[reason] = self.wasted_by_reason.get(reason, 0) + 1

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
