"""Standard-library TLS contexts for the KME side channels (ETSI 014 HTTPS, ETSI 004).

The tunnel's own TLS runs on tlslite; the KME APIs are ordinary TLS, served and consumed
with Python's ``ssl`` module. Mutual TLS everywhere.
"""

from __future__ import annotations

import functools
import ssl
import tempfile
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from qkdproxy.tls.credentials import Credentials


def _load_credentials(context: ssl.SSLContext, credentials: Credentials) -> None:
    # ssl loads certificates and keys from files only; keep them in a private temp dir for
    # the instant it takes.
    chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in credentials.chain)
    key = credentials.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with tempfile.TemporaryDirectory(prefix="qkdproxy-") as directory:
        cert_file, key_file = Path(directory, "cert.pem"), Path(directory, "key.pem")
        cert_file.write_bytes(chain)
        key_file.touch(mode=0o600)
        key_file.write_bytes(key)
        context.load_cert_chain(cert_file, key_file)


def _trust(context: ssl.SSLContext, anchors: Sequence[x509.Certificate]) -> None:
    pem = "".join(a.public_bytes(serialization.Encoding.PEM).decode() for a in anchors)
    context.load_verify_locations(cadata=pem)


def server_context(
    credentials: Credentials,
    anchors: Sequence[x509.Certificate],
    minimum: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2,
) -> ssl.SSLContext:
    """A server context that requires a client certificate issued by ``anchors``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = minimum
    context.verify_mode = ssl.CERT_REQUIRED
    _load_credentials(context, credentials)
    _trust(context, anchors)
    return context


def client_context(
    credentials: Credentials,
    anchors: Sequence[x509.Certificate],
    minimum: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2,
) -> ssl.SSLContext:
    """A client context presenting ``credentials`` and checking the server's name."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = minimum
    _load_credentials(context, credentials)
    _trust(context, anchors)
    return context


@functools.lru_cache(maxsize=1024)
def certificate_identity(der: bytes, source: str) -> str | None:
    """The caller's id from its certificate: the CN (``source='cn'``), or the last path
    segment of its first URI SAN (``source='uri'``: ``spiffe://td/sae/sae-a`` is ``sae-a``),
    so that ids stay usable in ETSI 014 URL paths.
    """
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        return None
    if source == "uri":
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            return None
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        segment = uris[0].rstrip("/").rsplit("/", 1)[-1] if uris else ""
        return segment or None
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


def peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket | None, source: str) -> str | None:
    """The verified peer's id on an established TLS connection, if it has one."""
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return certificate_identity(der, source) if der else None
