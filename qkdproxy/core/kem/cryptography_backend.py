"""KEMs on the `cryptography` package: ML-KEM-768/1024 and X25519, P-256, P-384 as KEMs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, mlkem, x25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from qkdproxy.core.kem.base import Kem, KemError, KemSizes, require_length

BACKEND = "cryptography"


@dataclass(frozen=True, slots=True)
class MlKem:
    """ML-KEM (FIPS 203) through OpenSSL as bundled with `cryptography`."""

    name: str
    sizes: KemSizes
    _generate: Callable[[], Any]
    _load_public: Callable[[bytes], Any]
    backend: str = BACKEND

    def generate(self) -> tuple[object, bytes]:
        """Return a fresh private key and its encoded public key."""
        private = self._generate()
        return private, private.public_key().public_bytes_raw()

    def encapsulate(self, public_key: bytes) -> tuple[bytes, bytes]:
        """Return ``(ciphertext, shared_secret)`` for the peer's public key."""
        require_length(f"{self.name} public key", public_key, self.sizes.public_key)
        try:
            shared, ciphertext = self._load_public(public_key).encapsulate()
        except ValueError as exc:
            raise KemError(f"{self.name} public key rejected: {exc}") from None
        return ciphertext, shared

    def decapsulate(self, private_key: object, ciphertext: bytes) -> bytes:
        """Recover the shared secret (ML-KEM rejects implicitly: a bad ciphertext yields noise)."""
        require_length(f"{self.name} ciphertext", ciphertext, self.sizes.ciphertext)
        try:
            return bytes(private_key.decapsulate(ciphertext))  # type: ignore[attr-defined]
        except ValueError as exc:
            raise KemError(f"{self.name} ciphertext rejected: {exc}") from None


@dataclass(frozen=True, slots=True)
class X25519Kem:
    """X25519 Diffie-Hellman as a KEM: the ciphertext is the responder's public value."""

    name: str = "X25519"
    backend: str = BACKEND

    @property
    def sizes(self) -> KemSizes:
        """32-byte public values and secret."""
        return KemSizes(public_key=32, ciphertext=32, shared_secret=32)

    def generate(self) -> tuple[object, bytes]:
        """Return a fresh private key and its 32-byte public value."""
        private = x25519.X25519PrivateKey.generate()
        return private, private.public_key().public_bytes_raw()

    def encapsulate(self, public_key: bytes) -> tuple[bytes, bytes]:
        """Answer the peer's public value with an ephemeral one and the shared secret."""
        private, public = self.generate()
        return public, self.decapsulate(private, public_key)

    def decapsulate(self, private_key: object, ciphertext: bytes) -> bytes:
        """Compute the X25519 shared secret; an all-zero result is rejected (RFC 8446 7.4.2)."""
        require_length("X25519 public value", ciphertext, self.sizes.ciphertext)
        assert isinstance(private_key, x25519.X25519PrivateKey)
        try:
            peer = x25519.X25519PublicKey.from_public_bytes(ciphertext)
            return private_key.exchange(peer)
        except ValueError as exc:
            raise KemError(f"X25519 public value rejected: {exc}") from None


@dataclass(frozen=True, slots=True)
class EcdhKem:
    """NIST-curve ECDH as a KEM, uncompressed points only (RFC 8446 4.2.8.2)."""

    name: str
    curve: ec.EllipticCurve
    sizes: KemSizes
    backend: str = BACKEND

    def generate(self) -> tuple[object, bytes]:
        """Return a fresh private key and its uncompressed public point."""
        private = ec.generate_private_key(self.curve)
        encoded = private.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
        return private, encoded

    def encapsulate(self, public_key: bytes) -> tuple[bytes, bytes]:
        """Answer the peer's point with an ephemeral one and the shared secret."""
        private, public = self.generate()
        return public, self.decapsulate(private, public_key)

    def decapsulate(self, private_key: object, ciphertext: bytes) -> bytes:
        """Compute the ECDH shared secret (the x coordinate) after validating the point."""
        require_length(f"{self.name} point", ciphertext, self.sizes.ciphertext)
        if ciphertext[0] != 0x04:
            raise KemError(f"{self.name} point is not in uncompressed form")
        assert isinstance(private_key, ec.EllipticCurvePrivateKey)
        try:
            peer = ec.EllipticCurvePublicKey.from_encoded_point(self.curve, ciphertext)
            return private_key.exchange(ec.ECDH(), peer)
        except ValueError as exc:
            raise KemError(f"{self.name} point rejected: {exc}") from None


def cryptography_kems() -> list[Kem]:
    """Every KEM this backend provides on this machine."""
    return [
        MlKem(
            "ML-KEM-768",
            KemSizes(public_key=1184, ciphertext=1088, shared_secret=32),
            mlkem.MLKEM768PrivateKey.generate,
            mlkem.MLKEM768PublicKey.from_public_bytes,
        ),
        MlKem(
            "ML-KEM-1024",
            KemSizes(public_key=1568, ciphertext=1568, shared_secret=32),
            mlkem.MLKEM1024PrivateKey.generate,
            mlkem.MLKEM1024PublicKey.from_public_bytes,
        ),
        X25519Kem(),
        EcdhKem("P-256", ec.SECP256R1(), KemSizes(65, 65, 32)),
        EcdhKem("P-384", ec.SECP384R1(), KemSizes(97, 97, 48)),
    ]
