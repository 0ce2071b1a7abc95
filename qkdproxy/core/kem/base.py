"""The one interface every key encapsulation mechanism implements.

Classical Diffie-Hellman groups are expressed as KEMs too (the "ciphertext" is the
responder's ephemeral public value), so hybrid groups can be composed uniformly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class KemError(ValueError):
    """Raised for malformed public keys or ciphertexts (the peer's fault)."""


@dataclass(frozen=True, slots=True)
class KemSizes:
    """Fixed byte sizes of a KEM's wire values."""

    public_key: int
    ciphertext: int
    shared_secret: int


class KemPrivateKey(Protocol):
    """Opaque private-key handle produced by :meth:`Kem.generate`."""


class Kem(Protocol):
    """A key encapsulation mechanism.

    ``generate`` returns the private handle and the public key bytes;
    ``encapsulate`` takes the peer's public key and returns ``(ciphertext, shared_secret)``;
    ``decapsulate`` recovers the shared secret. Wrong-length or invalid inputs raise
    :class:`KemError`.
    """

    @property
    def name(self) -> str: ...

    @property
    def sizes(self) -> KemSizes: ...

    @property
    def backend(self) -> str: ...

    def generate(self) -> tuple[object, bytes]: ...

    def encapsulate(self, public_key: bytes) -> tuple[bytes, bytes]: ...

    def decapsulate(self, private_key: object, ciphertext: bytes) -> bytes: ...


def require_length(what: str, value: bytes, expected: int) -> None:
    """Raise :class:`KemError` unless ``value`` is exactly ``expected`` bytes long."""
    if len(value) != expected:
        raise KemError(f"{what}: expected {expected} bytes, got {len(value)}")
