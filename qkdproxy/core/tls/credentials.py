"""Local TLS identity (certificate chain + private key) and CA bundles, loaded from PEM."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from qkdproxy.core.errors import SettingError

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
SUPPORTED_CURVES = ("secp256r1", "secp384r1", "secp521r1")


class CredentialError(SettingError):
    """A certificate, key or CA file that cannot be used; the message names the file."""


@dataclass(frozen=True, slots=True)
class Credentials:
    """A certificate chain (leaf first) and the leaf's private key. RSA or ECDSA only."""

    chain: tuple[x509.Certificate, ...]
    private_key: PrivateKey

    def __post_init__(self) -> None:
        if not self.chain:
            raise CredentialError("certificate chain is empty")
        if not isinstance(self.private_key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
            raise CredentialError("only RSA and ECDSA private keys are supported")
        if isinstance(self.private_key, ec.EllipticCurvePrivateKey) and (
            self.private_key.curve.name not in SUPPORTED_CURVES
        ):
            raise CredentialError(f"curve {self.private_key.curve.name} is not usable in TLS 1.3")
        if self.private_key.public_key() != self.chain[0].public_key():
            raise CredentialError("private key does not match the leaf certificate")

    @classmethod
    def load(cls, cert_path: Path | str, key_path: Path | str) -> Credentials:
        """Read a PEM chain and a PEM private key (unencrypted)."""
        chain = tuple(_read_certs(Path(cert_path)))
        key_file = Path(key_path)
        try:
            key = serialization.load_pem_private_key(_read(key_file), password=None)
        except (ValueError, TypeError) as exc:
            raise CredentialError(f"{key_file}: not a usable PEM private key ({exc})") from None
        if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
            raise CredentialError(f"{key_file}: only RSA and ECDSA keys are supported")
        try:
            return cls(chain, key)
        except CredentialError as exc:
            raise CredentialError(f"{cert_path} / {key_file}: {exc}") from None


def load_trust_anchors(path: Path | str) -> tuple[x509.Certificate, ...]:
    """Read a PEM CA bundle; at least one certificate is required."""
    return tuple(_read_certs(Path(path)))


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CredentialError(f"{path}: {exc.strerror or exc}") from None


def _read_certs(path: Path) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(_read(path))
    except ValueError as exc:
        raise CredentialError(f"{path}: not a PEM certificate file ({exc})") from None
    if not certs:
        raise CredentialError(f"{path}: no certificate found")
    return certs
