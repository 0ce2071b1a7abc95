"""Certificate policy: a matrix of weak and mis-issued peer and KME certificates, each
refused with the name of the rule it broke (tunnel peers through PeerPolicy, KMEs through
real stdlib TLS connections)."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from qkdproxy.core.tls.certpolicy import CertificatePolicy, CertificatePolicyError
from qkdproxy.core.tls.credentials import PrivateKey
from qkdproxy.core.tls.identity import AllowList
from qkdproxy.core.tls.verify import PeerPolicy, PeerRejectedError
from qkdproxy.keys.sslctx import client_context
from qkdproxy.sim.pki import CertificateAuthority

NAME = "peer.qkdproxy.test"
CLIENT_AUTH, SERVER_AUTH = ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH
SIGN_ONLY = dict.fromkeys(
    ("content_commitment", "key_encipherment", "data_encipherment", "key_agreement",
     "key_cert_sign", "crl_sign", "encipher_only", "decipher_only"), False,
)  # fmt: skip


def key_usage(**flags: bool) -> x509.KeyUsage:
    values = {"digital_signature": False, **SIGN_ONLY, **flags}
    return x509.KeyUsage(**values)


def leaf(
    ca: CertificateAuthority,
    key: PrivateKey | ec.EllipticCurvePrivateKey,
    *,
    eku: Sequence[x509.ObjectIdentifier] | None = (CLIENT_AUTH, SERVER_AUTH),
    usage: x509.KeyUsage | None = None,
) -> x509.Certificate:
    start = datetime.now(UTC) - timedelta(minutes=5)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "peer")]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(NAME), x509.DNSName("localhost")]), False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), False
        )
    )
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), False)
    if usage is not None:
        builder = builder.add_extension(usage, True)
    return builder.sign(ca.key, hashes.SHA256())


def p256() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


Role = Literal["client", "server"]
# (case, key, options, role the certificate is presented in, policy, expected rule)
MATRIX: list[tuple[str, str, dict[str, object], Role, CertificatePolicy, str]] = [
    ("rsa-1024", "rsa-1024", {}, "client", CertificatePolicy(), "min_rsa_bits"),
    ("rsa-1024-server", "rsa-1024", {}, "server", CertificatePolicy(), "min_rsa_bits"),
    ("rsa-2048-under-3072-floor", "rsa-2048", {}, "client",
     CertificatePolicy(min_rsa_bits=3072), "min_rsa_bits"),
    ("secp256k1", "secp256k1", {}, "client", CertificatePolicy(), "ec_curve"),
    ("p256-under-p384-floor", "p256", {}, "server", CertificatePolicy(min_ec_bits=384),
     "min_ec_bits"),
    ("key-encipherment-only", "p256", {"usage": key_usage(key_encipherment=True)}, "client",
     CertificatePolicy(), "key_usage"),
    ("cert-sign-only", "p256", {"usage": key_usage(key_cert_sign=True)}, "server",
     CertificatePolicy(), "key_usage"),
    ("no-key-usage-when-required", "p256", {}, "client",
     CertificatePolicy(require_key_usage=True), "key_usage"),
    ("server-eku-as-client", "p256", {"eku": [SERVER_AUTH]}, "client", CertificatePolicy(),
     "eku"),
    ("client-eku-as-server", "p256", {"eku": [CLIENT_AUTH]}, "server", CertificatePolicy(),
     "eku"),
    ("code-signing-eku", "p256", {"eku": [ExtendedKeyUsageOID.CODE_SIGNING]}, "client",
     CertificatePolicy(), "eku"),
    ("any-eku-only", "p256", {"eku": [ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE]}, "server",
     CertificatePolicy(), "eku"),
    ("no-eku-when-required", "p256", {"eku": None}, "server",
     CertificatePolicy(require_eku=True), "eku"),
]  # fmt: skip


def make_key(kind: str) -> PrivateKey | ec.EllipticCurvePrivateKey:
    if kind.startswith("rsa-"):
        return rsa.generate_private_key(65537, int(kind[4:]))
    return ec.generate_private_key(ec.SECP256K1() if kind == "secp256k1" else ec.SECP256R1())


@pytest.fixture(scope="module")
def keys() -> dict[str, PrivateKey | ec.EllipticCurvePrivateKey]:
    return {kind: make_key(kind) for kind in ("rsa-1024", "rsa-2048", "secp256k1", "p256")}


@pytest.mark.parametrize(
    ("kind", "options", "role", "policy", "rule"),
    [case[1:] for case in MATRIX],
    ids=[case[0] for case in MATRIX],
)
def test_tunnel_peer_certificate_matrix(
    ca: CertificateAuthority,
    keys: dict[str, PrivateKey | ec.EllipticCurvePrivateKey],
    kind: str,
    options: dict[str, object],
    role: Role,
    policy: CertificatePolicy,
    rule: str,
) -> None:
    cert = leaf(ca, keys[kind], **options)  # type: ignore[arg-type]
    peer = PeerPolicy((ca.certificate,), AllowList(any_peer=True), NAME, policy)
    chain = [cert.public_bytes(Encoding.DER)]
    verify = peer.verify_client if role == "client" else peer.verify_server
    with pytest.raises(PeerRejectedError) as info:
        verify(chain, datetime.now(UTC))
    assert info.value.rule == rule
    assert f"certificate policy {rule}:" in info.value.reason


def test_a_weak_intermediate_is_refused_too(ca: CertificateAuthority) -> None:
    weak = rsa.generate_private_key(65537, 1024)
    inter = leaf(ca, weak, eku=None, usage=key_usage(key_cert_sign=True, crl_sign=True))
    with pytest.raises(CertificatePolicyError) as info:
        CertificatePolicy().check([leaf(ca, p256()), inter], "client")
    assert info.value.rule == "min_rsa_bits" and "chain[1]" in str(info.value)


@pytest.mark.parametrize(
    "options",
    [{}, {"usage": key_usage(digital_signature=True, key_encipherment=True)}, {"eku": None}],
    ids=["dev-pki-shape", "digital-signature", "no-eku"],
)  # fmt: skip
def test_good_certificates_pass_both_roles(
    ca: CertificateAuthority, options: dict[str, object]
) -> None:
    cert = leaf(ca, p256(), **options)  # type: ignore[arg-type]
    peer = PeerPolicy((ca.certificate,), AllowList(any_peer=True), NAME)
    chain = [cert.public_bytes(Encoding.DER)]
    assert peer.verify_client(chain, datetime.now(UTC)).common_name == "peer"
    assert peer.verify_server(chain, datetime.now(UTC)).common_name == "peer"


# ---------------------------------------------------------------- KMEs (stdlib TLS)


async def kme_handshake(
    ca: CertificateAuthority, cert: x509.Certificate, key: PrivateKey, policy: CertificatePolicy,
    tmp: Path,
) -> str:  # fmt: skip
    """Connect an SAE client context to a TLS server presenting ``cert``; "ok" or why the
    client refused."""
    sae = ca.issue("sae", ["sae.qkdproxy.test"])
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # A weak test KME must be able to load its key at all (OpenSSL's level 2 refuses RSA-1024).
    server.set_ciphers("DEFAULT:@SECLEVEL=0")
    pem = tmp / "kme.pem"
    pem.write_bytes(
        key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        + cert.public_bytes(Encoding.PEM)
    )
    server.load_cert_chain(pem)

    async def handle(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    listener = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server)
    port = listener.sockets[0].getsockname()[1]
    try:
        context = client_context(sae, [ca.certificate], policy=policy)
        _, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname=NAME), 10
        )
        writer.close()
        return "ok"
    except ssl.SSLError as exc:
        return str(exc)
    finally:
        listener.close()


KME_CASES = [c for c in MATRIX if c[3] == "server" or c[0] == "rsa-2048-under-3072-floor"]


@pytest.mark.parametrize(
    ("kind", "options", "policy", "rule"),
    [(c[1], c[2], c[4], c[5]) for c in KME_CASES],
    ids=[c[0] for c in KME_CASES],
)
async def test_kme_certificate_matrix_over_real_tls(
    ca: CertificateAuthority,
    keys: dict[str, PrivateKey | ec.EllipticCurvePrivateKey],
    kind: str,
    options: dict[str, object],
    policy: CertificatePolicy,
    rule: str,
    tmp_path: Path,
) -> None:
    cert = leaf(ca, keys[kind], **options)  # type: ignore[arg-type]
    why = await kme_handshake(ca, cert, keys[kind], policy, tmp_path)
    # OpenSSL checks key strength (security level 2) and purpose (keyUsage, EKU) while it
    # verifies, before our rule runs after the handshake: its refusals are named too.
    named = (f"certificate policy {rule}:", "key too weak", "unsuitable certificate purpose")
    assert any(reason in why for reason in named), why


async def test_a_good_kme_certificate_passes(ca: CertificateAuthority, tmp_path: Path) -> None:
    kme = ca.issue("kme", [NAME], client=False)
    outcome = await kme_handshake(ca, kme.chain[0], kme.private_key, CertificatePolicy(), tmp_path)
    assert outcome == "ok"
