"""QKD key values, key-id conversions and the errors key sources raise."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from qkdproxy.core.errors import QkdproxyError

KEY_ID_SIZE = 16
KEY_SIZE = 32


class QkdKeyError(QkdproxyError):
    """Base of every key-source failure; ``kind`` classifies it for metrics."""

    kind: str | None = None


class KeyNotFoundError(QkdKeyError):
    """The key id is unknown, already used, expired, or not meant for this caller."""


class KeySourceUnavailableError(QkdKeyError):
    """The KME (or the link behind it) cannot be reached or is failing."""


class KeyExhaustedError(QkdKeyError):
    """The key pool is empty."""


class KsidInUseError(QkdKeyError):
    """ETSI 004 status 5: the application already opened this key stream."""


class PeerNotConnectedError(QkdKeyError):
    """ETSI 004: the peer application has not opened the key stream."""


@dataclass(frozen=True, slots=True)
class QkdKey:
    """A QKD key and its 16-byte id. The key bytes never appear in ``repr``."""

    key_id: bytes
    material: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.key_id) != KEY_ID_SIZE:
            raise ValueError(f"key id must be {KEY_ID_SIZE} bytes, got {len(self.key_id)}")
        if len(self.material) != KEY_SIZE:
            raise ValueError(f"QKD key must be {KEY_SIZE} bytes, got {len(self.material)}")

    @property
    def key_id_text(self) -> str:
        """The id as ETSI 014 writes it (lowercase 8-4-4-4-12)."""
        return key_id_to_text(self.key_id)


@dataclass(slots=True)
class HeldKey:
    """A key kept in memory ahead of use, with when it was fetched (for ``max_age_s``)."""

    key: QkdKey = field(repr=False)
    fetched_at: float


def key_id_to_text(key_id: bytes) -> str:
    """Binary key id (``uuid.UUID(s).bytes``) to the lowercase UUID string used by ETSI 014;
    ValueError unless it is 16 bytes."""
    # Formatted directly: str(uuid.UUID(bytes=...)) builds an int and costs about five times
    # as much, and a connection formats its key id on each side.
    if len(key_id) != KEY_ID_SIZE:
        raise ValueError(f"key id must be {KEY_ID_SIZE} bytes, got {len(key_id)}")
    h = key_id.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def key_id_from_text(text: str) -> bytes:
    """ETSI 014 UUID string to its 16-byte wire form; ValueError if it is not a UUID."""
    return uuid.UUID(text).bytes
