"""Hybrid key exchange arithmetic: compose KEM components and attach QKD material.

Pure functions and values only (no I/O, no TLS). Wire layout, as in the reference provider:

    client key share = component public keys || key_id      (key_id: 16 bytes, QKD groups)
    server key share = component ciphertexts || key_id
    shared secret    = component secrets     || qkd_key     (qkd_key: 32 bytes, always last)
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field

from qkdproxy.core.errors import SettingError
from qkdproxy.core.groups import GroupSpec
from qkdproxy.core.kem.base import Kem, KemError
from qkdproxy.core.kem.registry import KemRegistry, UnavailableKem
from qkdproxy.core.keys import KEY_ID_SIZE
from qkdproxy.core.keys import KEY_SIZE as QKD_KEY_SIZE

__all__ = [
    "KEY_ID_SIZE",
    "QKD_KEY_SIZE",
    "ZERO_KEY_ID",
    "ClientPrivate",
    "GroupUnavailableError",
    "HybridKem",
    "KeyPairReserve",
    "attach_key_id",
    "detach_key_id",
    "key_ids_equal",
    "resolve",
    "with_qkd_key",
]

ZERO_KEY_ID = bytes(KEY_ID_SIZE)


class GroupUnavailableError(SettingError):
    """A group whose KEM components cannot run on this machine."""


@dataclass(frozen=True, slots=True)
class ClientPrivate:
    """The client's private handles, one per component, in wire order."""

    handles: tuple[object, ...] = field(repr=False)


@dataclass(frozen=True, slots=True)
class HybridKem:
    """A group's KEM components composed by concatenation, sizes fixed per component."""

    group: GroupSpec
    components: tuple[Kem, ...]

    @property
    def public_size(self) -> int:
        """Bytes of the composed public value, without the key id."""
        return sum(kem.sizes.public_key for kem in self.components)

    @property
    def ciphertext_size(self) -> int:
        """Bytes of the composed ciphertext, without the key id."""
        return sum(kem.sizes.ciphertext for kem in self.components)

    @property
    def client_share_size(self) -> int:
        """Bytes of the client's key share on the wire."""
        return self.public_size + (KEY_ID_SIZE if self.group.qkd else 0)

    @property
    def server_share_size(self) -> int:
        """Bytes of the server's key share on the wire."""
        return self.ciphertext_size + (KEY_ID_SIZE if self.group.qkd else 0)

    @property
    def secret_size(self) -> int:
        """Bytes of the (EC)DHE input to the TLS 1.3 key schedule."""
        pq = sum(kem.sizes.shared_secret for kem in self.components)
        return pq + (QKD_KEY_SIZE if self.group.qkd else 0)

    def generate(self) -> tuple[ClientPrivate, bytes]:
        """Client side: fresh key pairs for every component and the composed public value."""
        pairs = [kem.generate() for kem in self.components]
        return ClientPrivate(tuple(p for p, _ in pairs)), b"".join(pub for _, pub in pairs)

    def encapsulate(self, public: bytes) -> tuple[bytes, bytes]:
        """Server side: return ``(ciphertext, secret)`` without QKD parts."""
        parts = _split(public, [kem.sizes.public_key for kem in self.components], "public value")
        results = [kem.encapsulate(part) for kem, part in zip(self.components, parts, strict=True)]
        return b"".join(ct for ct, _ in results), b"".join(ss for _, ss in results)

    def decapsulate(self, private: ClientPrivate, ciphertext: bytes) -> bytes:
        """Client side: recover the secret (without the QKD key) from the composed ciphertext."""
        parts = _split(ciphertext, [kem.sizes.ciphertext for kem in self.components], "ciphertext")
        return b"".join(
            kem.decapsulate(handle, part)
            for kem, handle, part in zip(self.components, private.handles, parts, strict=True)
        )


# A spare key pair older than this is not used (a fresh one is generated instead): an
# ephemeral key is not kept for a handshake that may come much later.
SPARE_MAX_AGE_S = 30.0


class KeyPairReserve:
    """One client key pair per group, generated ahead of use (time is passed in).

    A client generates its key pairs (ML-KEM-768 and X25519 together: about 0.17 ms here)
    before its ClientHello can leave, on every connection's critical path. A handshake that
    takes a spare instead leaves at once, and the I/O layer calls :meth:`replenish` after
    the hello left, while the server works on it. Each spare is handed out once; only a
    group a handshake used gets one, and a spare older than ``max_age_s`` (or made at a
    time after ``now``) is dropped unused, so a quiet endpoint holds at most one stale pair
    per group until its next handshake.
    """

    def __init__(self, max_age_s: float = SPARE_MAX_AGE_S) -> None:
        self._max_age_s = max_age_s
        self._spares: dict[int, tuple[ClientPrivate, bytes, float]] = {}
        self._wanted: dict[int, HybridKem] = {}

    def take(self, hybrid: HybridKem, now: float) -> tuple[ClientPrivate, bytes]:
        """The spare pair for ``hybrid``'s group if a fresh one is held, else a new pair."""
        code = hybrid.group.code_point
        self._wanted[code] = hybrid
        spare = self._spares.pop(code, None)
        # A time before the spare's making (a clock set back, a bad value) leaves its age
        # unknown: dropped like a stale one.
        if spare is not None and 0.0 <= now - spare[2] <= self._max_age_s:
            return spare[0], spare[1]
        return hybrid.generate()

    def replenish(self, now: float) -> None:
        """Generate a spare for each group taken from since the last call."""
        wanted, self._wanted = self._wanted, {}
        for code, hybrid in wanted.items():
            if code not in self._spares:
                private, share = hybrid.generate()
                self._spares[code] = (private, share, now)

    @property
    def held(self) -> int:
        """Spare pairs held now."""
        return len(self._spares)


def _split(value: bytes, sizes: list[int], what: str) -> list[bytes]:
    if len(value) != sum(sizes):
        raise KemError(f"{what}: expected {sum(sizes)} bytes, got {len(value)}")
    parts, offset = [], 0
    for size in sizes:
        parts.append(value[offset : offset + size])
        offset += size
    return parts


def resolve(group: GroupSpec, registry: KemRegistry) -> HybridKem:
    """Bind a group to this machine's KEMs; :class:`GroupUnavailableError` says which is missing."""
    kems: list[Kem] = []
    for name in group.components:
        kem = registry.get(name)
        if isinstance(kem, UnavailableKem):
            raise GroupUnavailableError(f"group {group.name}: {kem.reason}")
        kems.append(kem)
    return HybridKem(group, tuple(kems))


def attach_key_id(body: bytes, key_id: bytes) -> bytes:
    """Append the 16-byte QKD key id to a public value or ciphertext."""
    if len(key_id) != KEY_ID_SIZE:
        raise ValueError(f"key id must be {KEY_ID_SIZE} bytes")
    return body + key_id


def detach_key_id(share: bytes, body_size: int) -> tuple[bytes, bytes]:
    """Split ``body || key_id``; :class:`KemError` unless the length is exact."""
    if len(share) != body_size + KEY_ID_SIZE:
        raise KemError(f"key share: expected {body_size + KEY_ID_SIZE} bytes, got {len(share)}")
    return share[:body_size], share[body_size:]


def with_qkd_key(pq_secret: bytes, qkd_key: bytes) -> bytes:
    """The QKD-KEM shared secret: the PQ secret followed by the 32-byte QKD key."""
    if len(qkd_key) != QKD_KEY_SIZE:
        raise ValueError(f"QKD key must be {QKD_KEY_SIZE} bytes")
    return pq_secret + qkd_key


def key_ids_equal(a: bytes, b: bytes) -> bool:
    """Constant-time comparison of key ids."""
    return hmac.compare_digest(a, b)
