"""What a TLS connection reports to its driver: one frozen dataclass per event."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qkdproxy.core.tls.keyexchange import KeyRequest


class Side(Enum):
    """Who sent a fatal alert: we did (the peer broke the protocol) or the peer did."""

    LOCAL = "local"
    REMOTE = "remote"


@dataclass(frozen=True, slots=True)
class DataReceived:
    """Application bytes from the peer (never empty; a bytearray when several records
    were opened into one buffer, so no copy joins them)."""

    data: bytes | bytearray


@dataclass(frozen=True, slots=True)
class KeysUpdated:
    """New traffic keys for one direction (``"read"`` or ``"write"``)."""

    direction: str
    requested: bool = False


@dataclass(frozen=True, slots=True)
class PeerClosed:
    """The peer ended the stream with a protected close_notify."""


@dataclass(frozen=True, slots=True)
class Truncated:
    """The transport ended without a protected close_notify: not a clean end."""

    reason: str


@dataclass(frozen=True, slots=True)
class Failed:
    """The connection ended with a fatal ``alert`` (None: no alert, e.g. a timeout),
    sent by ``side``."""

    alert: int | None
    side: Side
    reason: str


@dataclass(frozen=True, slots=True)
class UpdateKeyNeeded:
    """An Extended Key Update needs this key-source call answered
    (:meth:`RecordLayer.answer_update_key`; an ETSI 004 close needs no answer)."""

    request: KeyRequest


@dataclass(frozen=True, slots=True)
class FreshKeysInstalled:
    """An Extended Key Update completed: both directions run on keys from a fresh key
    exchange (``key_id``: the QKD key it spent, None on a PQ-only group)."""

    generation: int
    initiator: bool
    key_id: str | None


RecordEvent = (
    DataReceived
    | KeysUpdated
    | PeerClosed
    | Truncated
    | Failed
    | UpdateKeyNeeded
    | FreshKeysInstalled
)
