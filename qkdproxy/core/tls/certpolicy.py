"""What a peer's (or a KME's) certificate must be, beyond a valid chain (pure).

Chain validation proves who issued a certificate; this policy refuses certificates that a
trusted CA issued but that are too weak or meant for something else: short keys, a key
usage without digitalSignature (TLS 1.3 signs with the leaf key), an extended key usage
for the other role. Every refusal names the rule that failed, so an operator can tell a
weak key from a mis-issued certificate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

Role = Literal["client", "server"]
ROLE_EKU = {
    "client": (ExtendedKeyUsageOID.CLIENT_AUTH, "clientAuth"),
    "server": (ExtendedKeyUsageOID.SERVER_AUTH, "serverAuth"),
}
# NIST prime curves only: TLS 1.3 signature schemes name no other (RFC 8446 4.2.3).
EC_CURVES = {"secp256r1": 256, "secp384r1": 384, "secp521r1": 521}


class CertificatePolicyError(ValueError):
    """A certificate broke ``rule`` (a short, stable name: ``min_rsa_bits``, ``eku``...)."""

    def __init__(self, rule: str, detail: str) -> None:
        super().__init__(f"certificate policy {rule}: {detail}")
        self.rule = rule
        self.detail = detail


@dataclass(frozen=True, slots=True)
class CertificatePolicy:
    """The rules; the defaults are the floor, the flags tighten further."""

    min_rsa_bits: int = 2048
    min_ec_bits: int = 256
    # Tighten: the leaf must carry the extension (by default it is checked when present).
    require_key_usage: bool = False
    require_eku: bool = False

    def check(self, chain: Sequence[x509.Certificate], role: Role) -> None:
        """Raise :class:`CertificatePolicyError` unless ``chain`` (leaf first, as sent by a
        peer acting as ``role``) meets the policy."""
        for position, cert in enumerate(chain):
            self._check_key(cert, "leaf" if position == 0 else f"chain[{position}]")
        if chain:
            self._check_usage(chain[0], role)

    def _check_key(self, cert: x509.Certificate, where: str) -> None:
        try:
            key = cert.public_key()
        except (ValueError, UnsupportedAlgorithm):
            raise CertificatePolicyError("key_type", f"{where} key cannot be read") from None
        if isinstance(key, rsa.RSAPublicKey):
            if key.key_size < self.min_rsa_bits:
                raise CertificatePolicyError(
                    "min_rsa_bits", f"{where} RSA key {key.key_size} bits < {self.min_rsa_bits}"
                )
        elif isinstance(key, ec.EllipticCurvePublicKey):
            bits = EC_CURVES.get(key.curve.name)
            if bits is None:
                raise CertificatePolicyError("ec_curve", f"{where} curve {key.curve.name}")
            if bits < self.min_ec_bits:
                raise CertificatePolicyError(
                    "min_ec_bits", f"{where} EC key {bits} bits < {self.min_ec_bits}"
                )
        elif isinstance(key, dsa.DSAPublicKey) or not isinstance(
            key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
        ):
            raise CertificatePolicyError("key_type", f"{where} {type(key).__name__} not allowed")

    def _check_usage(self, leaf: x509.Certificate, role: Role) -> None:
        try:
            usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
        except x509.ExtensionNotFound:
            if self.require_key_usage:
                raise CertificatePolicyError("key_usage", "leaf has no keyUsage") from None
        else:
            if not usage.digital_signature:
                raise CertificatePolicyError(
                    "key_usage", "leaf keyUsage does not allow digitalSignature"
                )
        try:
            purposes = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            if self.require_eku:
                raise CertificatePolicyError("eku", "leaf has no EKU (extendedKeyUsage)") from None
            return
        wanted, name = ROLE_EKU[role]
        # anyExtendedKeyUsage is not enough: the chain validator refuses it as well.
        if wanted not in purposes:
            raise CertificatePolicyError(
                "eku", f"leaf EKU (extendedKeyUsage) lacks {name} for a {role}"
            )


def check_der(policy: CertificatePolicy, chain: Sequence[bytes], role: Role) -> None:
    """:meth:`CertificatePolicy.check` on DER certificates (a parse failure is a refusal)."""
    try:
        certs = [x509.load_der_x509_certificate(bytes(der)) for der in chain]
    except ValueError:
        raise CertificatePolicyError("parse", "malformed certificate") from None
    policy.check(certs, role)
