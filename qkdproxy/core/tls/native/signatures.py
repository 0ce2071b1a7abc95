"""CertificateVerify signatures (RFC 8446 4.4.3) with `cryptography`.

qkdproxy signs with the ECDSA and RSA keys :mod:`credentials` loads and verifies the same
kinds: ECDSA on the curve its scheme names, RSA-PSS with an rsaEncryption key. PKCS#1 v1.5
is offered for certificate signatures only; a CertificateVerify using it is refused.
"""

from __future__ import annotations

from collections import OrderedDict

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from qkdproxy.core.tls.codec import MessageError
from qkdproxy.core.tls.credentials import PrivateKey
from qkdproxy.core.tls.wire import Alert

_ECDSA: dict[int, tuple[str, type[hashes.HashAlgorithm]]] = {
    0x0403: ("secp256r1", hashes.SHA256),
    0x0503: ("secp384r1", hashes.SHA384),
    0x0603: ("secp521r1", hashes.SHA512),
}
_RSA_PSS: dict[int, type[hashes.HashAlgorithm]] = {
    0x0804: hashes.SHA256,
    0x0805: hashes.SHA384,
    0x0806: hashes.SHA512,
}
# What we accept in a CertificateVerify, in our order of preference.
VERIFY_SCHEMES: tuple[int, ...] = (*_ECDSA, *_RSA_PSS)
# What signature_algorithms offers: the above, plus PKCS#1 v1.5 for certificate signatures
# (RFC 8446 4.2.3 allows them there; most RSA CAs still sign with them).
OFFERED_SCHEMES: tuple[int, ...] = (*VERIFY_SCHEMES, 0x0401, 0x0501, 0x0601)

SERVER_CONTEXT = b" " * 64 + b"TLS 1.3, server CertificateVerify\x00"
CLIENT_CONTEXT = b" " * 64 + b"TLS 1.3, client CertificateVerify\x00"

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


def signable_schemes(key: PrivateKey) -> tuple[int, ...]:
    """The schemes ``key`` can sign with, ours first."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return tuple(s for s, (curve, _) in _ECDSA.items() if curve == key.curve.name)
    return tuple(_RSA_PSS)


def choose_scheme(ours: tuple[int, ...], peer_offers: tuple[int, ...]) -> int | None:
    """The first scheme of the peer's list that we can sign with (the peer's preference)."""
    return next((s for s in peer_offers if s in ours), None)


def sign(key: PrivateKey, scheme: int, content: bytes) -> bytes:
    """Sign ``content`` with ``scheme`` (one of :func:`signable_schemes`)."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(content, ec.ECDSA(_ECDSA[scheme][1]()))
    algorithm = _RSA_PSS[scheme]()
    pss = padding.PSS(padding.MGF1(algorithm), algorithm.digest_size)
    return key.sign(content, pss, algorithm)


# Peer leaf certificates repeat on every connection: their public keys are kept (bounded).
_KEYS: OrderedDict[bytes, PublicKey] = OrderedDict()
_KEYS_MAX = 256


def leaf_key(der: bytes) -> PublicKey:
    """The public key of a DER certificate; bad_certificate if unusable."""
    key = _KEYS.get(der)
    if key is not None:
        _KEYS.move_to_end(der)
        return key
    try:
        found = x509.load_der_x509_certificate(der).public_key()
    except (ValueError, UnsupportedAlgorithm):
        raise MessageError("peer certificate cannot be parsed", Alert.BAD_CERTIFICATE) from None
    if not isinstance(found, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise MessageError(
            "peer certificate key is not RSA or ECDSA", Alert.UNSUPPORTED_CERTIFICATE
        )
    _KEYS[der] = found
    if len(_KEYS) > _KEYS_MAX:
        _KEYS.popitem(last=False)
    return found


def verify(key: PublicKey, scheme: int, signature: bytes, content: bytes) -> None:
    """Check a CertificateVerify signature; raises :class:`MessageError` with the alert."""
    if scheme not in VERIFY_SCHEMES:
        raise MessageError(f"signature scheme {scheme:#06x} not offered", Alert.ILLEGAL_PARAMETER)
    try:
        if scheme in _ECDSA:
            curve, algorithm = _ECDSA[scheme]
            if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != curve:
                raise MessageError(
                    "signature scheme does not match the key", Alert.ILLEGAL_PARAMETER
                )
            key.verify(signature, content, ec.ECDSA(algorithm()))
        else:
            if not isinstance(key, rsa.RSAPublicKey):
                raise MessageError(
                    "signature scheme does not match the key", Alert.ILLEGAL_PARAMETER
                )
            hash_alg = _RSA_PSS[scheme]()
            pss = padding.PSS(padding.MGF1(hash_alg), hash_alg.digest_size)
            key.verify(signature, content, pss, hash_alg)
    except InvalidSignature:
        raise MessageError("CertificateVerify signature is invalid", Alert.DECRYPT_ERROR) from None
