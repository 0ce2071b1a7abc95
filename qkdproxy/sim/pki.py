"""A development PKI: one CA, and leaf certificates for TLS servers and clients.

Used by tests, benchmarks and demos; ``qkdproxy certs`` writes the same thing to disk.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from qkdproxy.core.tls.credentials import Credentials, PrivateKey

KeyType = Literal["ecdsa-p256", "ecdsa-p384", "rsa-2048", "rsa-3072"]


def new_key(key_type: KeyType) -> PrivateKey:
    """A fresh private key of the given type."""
    if key_type == "ecdsa-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ecdsa-p384":
        return ec.generate_private_key(ec.SECP384R1())
    return rsa.generate_private_key(65537, int(key_type.split("-")[1]))


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    general: list[x509.GeneralName] = []
    for name in names:
        if "://" in name:
            general.append(x509.UniformResourceIdentifier(name))
            continue
        try:
            general.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            general.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(general)


@dataclass(frozen=True, slots=True)
class CertificateAuthority:
    """A self-signed CA that issues leaf certificates."""

    certificate: x509.Certificate
    key: PrivateKey

    @classmethod
    def create(
        cls,
        name: str = "qkdproxy development CA",
        key_type: KeyType = "ecdsa-p256",
        now: datetime | None = None,
        days: int = 3650,
    ) -> CertificateAuthority:
        """A new CA valid from ``now`` for ``days``."""
        now = now or datetime.now(UTC)
        key = new_key(key_type)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    def issue(
        self,
        common_name: str,
        names: list[str],
        *,
        server: bool = True,
        client: bool = True,
        key_type: KeyType = "ecdsa-p256",
        now: datetime | None = None,
        days: int = 825,
    ) -> Credentials:
        """A leaf certificate for ``names`` (DNS names, IP addresses or URIs; none: no SAN
        extension, the CN only) and its key."""
        now = now or datetime.now(UTC)
        key = new_key(key_type)
        usages = [ExtendedKeyUsageOID.SERVER_AUTH] * server
        usages += [ExtendedKeyUsageOID.CLIENT_AUTH] * client
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
        )
        if names:
            # No names: a CN-only certificate (as many vendor KMEs have); an empty SAN
            # extension would be malformed (RFC 5280 4.2.1.6).
            builder = builder.add_extension(_san(names), critical=False)
        return Credentials((builder.sign(self.key, hashes.SHA256()),), key)
