"""Standard-library TLS contexts for the KME side channels (ETSI 014 HTTPS, ETSI 004).

The tunnel's own TLS runs on tlslite; the KME APIs are ordinary TLS, served and consumed
with Python's ``ssl`` module. Mutual TLS everywhere.
"""

from __future__ import annotations

import functools
import os
import ssl
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from qkdproxy.core.tls.certpolicy import CertificatePolicy, CertificatePolicyError, Role, check_der
from qkdproxy.core.tls.credentials import Credentials

DEFAULT_POLICY = CertificatePolicy()


def _load_credentials(context: ssl.SSLContext, credentials: Credentials) -> None:
    # ssl loads keys from files only. The key goes through an anonymous memory file
    # (memfd), reached by its /proc path: no copy of it is written to any file system.
    chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in credentials.chain)
    key = credentials.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.memfd_create("qkdproxy-credentials", os.MFD_CLOEXEC)
    try:
        data = memoryview(key + chain)
        while data:
            data = data[os.write(fd, data) :]
        context.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def _trust(context: ssl.SSLContext, anchors: Sequence[x509.Certificate]) -> None:
    pem = "".join(a.public_bytes(serialization.Encoding.PEM).decode() for a in anchors)
    context.load_verify_locations(cadata=pem)


class PolicyCheckedObject(ssl.SSLObject):
    """An SSLObject that applies a :class:`CertificatePolicy` to the peer's certificate as
    soon as the handshake completes (asyncio, hence aiohttp and the ETSI 004 client, builds
    its TLS connections with ``wrap_bio``, which uses ``sslobject_class``)."""

    policy: CertificatePolicy = CertificatePolicy()
    peer_role: Role = "server"

    def do_handshake(self) -> None:
        """Complete the handshake, then refuse a peer certificate the policy rejects."""
        super().do_handshake()
        # The leaf only: ssl gives no verified chain before Python 3.13.
        leaf = self.getpeercert(binary_form=True)
        if not leaf:
            return  # no certificate: ssl's own verification already decided
        try:
            check_der(self.policy, [leaf], self.peer_role)
        except CertificatePolicyError as exc:
            raise ssl.SSLCertVerificationError(1, str(exc)) from None


def _enforce(context: ssl.SSLContext, policy: CertificatePolicy | None, peer_role: Role) -> None:
    if policy is None:
        return
    checked = type(
        "PolicyCheckedObject", (PolicyCheckedObject,), {"policy": policy, "peer_role": peer_role}
    )
    context.sslobject_class = checked


def server_context(
    credentials: Credentials,
    anchors: Sequence[x509.Certificate],
    minimum: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2,
    policy: CertificatePolicy | None = DEFAULT_POLICY,
) -> ssl.SSLContext:
    """A server context that requires a client certificate issued by ``anchors`` (and
    meeting ``policy`` once the handshake is done; None: no policy check)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _enforce(context, policy, "client")
    context.minimum_version = minimum
    context.verify_mode = ssl.CERT_REQUIRED
    _load_credentials(context, credentials)
    _trust(context, anchors)
    return context


def client_context(
    credentials: Credentials,
    anchors: Sequence[x509.Certificate],
    minimum: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2,
    policy: CertificatePolicy | None = DEFAULT_POLICY,
) -> ssl.SSLContext:
    """A client context presenting ``credentials``, checking the server's name and, once
    the handshake is done, ``policy`` on its certificate (None: no policy check)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _enforce(context, policy, "server")
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
