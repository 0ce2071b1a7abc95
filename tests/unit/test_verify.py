"""Certificate chain validation, allow-lists and credential loading (pure: no sockets)."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st

from qkdproxy.core.tls import verify
from qkdproxy.core.tls.credentials import (
    CredentialError,
    Credentials,
    PrivateKey,
    load_trust_anchors,
)
from qkdproxy.core.tls.identity import AllowList, AllowRule, PeerIdentity, RuleKind
from qkdproxy.core.tls.verify import MAX_CHAIN_DEPTH, PeerPolicy, PeerRejectedError
from qkdproxy.core.tls.wire import Alert
from qkdproxy.sim.pki import CertificateAuthority, KeyType, new_key

SERVER = "server.qkdproxy.test"
CLIENT_URI = "spiffe://qkdproxy.test/client"
ANY = AllowList(any_peer=True)


def der(creds: Credentials) -> list[bytes]:
    """The DER chain a peer would send."""
    return [c.public_bytes(Encoding.DER) for c in creds.chain]


def now() -> datetime:
    return datetime.now(UTC)


def server_policy(
    ca: CertificateAuthority, name: str = SERVER, allow: AllowList = ANY
) -> PeerPolicy:
    return PeerPolicy((ca.certificate,), allow, name)


def client_policy(ca: CertificateAuthority, allow: AllowList = ANY) -> PeerPolicy:
    return PeerPolicy((ca.certificate,), allow)


def identity(
    cn: str | None = None, dns: tuple[str, ...] = (), uris: tuple[str, ...] = ()
) -> PeerIdentity:
    return PeerIdentity(cn, dns, uris, "00" * 32)


def intermediate_ca(
    root: CertificateAuthority, key_type: KeyType = "ecdsa-p256"
) -> CertificateAuthority:
    """A CA certificate signed by ``root`` (built by hand: pki only makes self-signed CAs)."""
    key = new_key(key_type)
    start = now() - timedelta(minutes=5)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "intermediate CA")]))
        .issuer_name(root.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root.key.public_key()), False
        )
        .sign(root.key, hashes.SHA256())
    )
    return CertificateAuthority(cert, key)


def reject(call: object) -> PeerRejectedError:
    """Run ``call`` (a zero-argument callable) and return the rejection it raises."""
    assert callable(call)
    with pytest.raises(PeerRejectedError) as info:
        call()
    return info.value


# ---------------------------------------------------------------------- valid chains


@pytest.mark.parametrize("key_type", ["ecdsa-p256", "ecdsa-p384", "rsa-2048"])
def test_valid_server_chain_for_dns_name(ca: CertificateAuthority, key_type: KeyType) -> None:
    creds = ca.issue("server", [SERVER, "127.0.0.1"], client=False, key_type=key_type)
    peer = server_policy(ca).verify_server(der(creds), now())
    assert peer.common_name == "server"
    assert peer.dns_names == (SERVER,)
    assert peer.uris == ()
    assert peer.fingerprint_sha256 == creds.chain[0].fingerprint(hashes.SHA256()).hex()
    assert peer.describe() == SERVER


@pytest.mark.parametrize("key_type", ["ecdsa-p256", "rsa-2048"])
@pytest.mark.parametrize("address", ["127.0.0.1", "::1"])
def test_valid_server_chain_for_ip_address(
    ca: CertificateAuthority, key_type: KeyType, address: str
) -> None:
    creds = ca.issue("server", [SERVER, address], client=False, key_type=key_type)
    peer = server_policy(ca, address).verify_server(der(creds), now())
    assert peer.dns_names == (SERVER,)


def test_ip_name_does_not_match_dns_only_certificate(ca: CertificateAuthority) -> None:
    creds = ca.issue("server", [SERVER], client=False)
    error = reject(lambda: server_policy(ca, "127.0.0.1").verify_server(der(creds), now()))
    assert error.alert is Alert.BAD_CERTIFICATE


def test_server_name_match_is_case_insensitive(ca: CertificateAuthority) -> None:
    creds = ca.issue("server", [SERVER], client=False)
    assert server_policy(ca, SERVER.upper()).verify_server(der(creds), now()).dns_names == (SERVER,)


@pytest.mark.parametrize("key_type", ["ecdsa-p256", "rsa-2048"])
def test_valid_client_chain(ca: CertificateAuthority, key_type: KeyType) -> None:
    creds = ca.issue("client", [CLIENT_URI], server=False, key_type=key_type)
    allow = AllowList.of([f"uri:{CLIENT_URI}"])
    peer = client_policy(ca, allow).verify_client(der(creds), now())
    assert peer.uris == (CLIENT_URI,)
    assert peer.describe() == CLIENT_URI


def test_chain_through_intermediate_ca(ca: CertificateAuthority) -> None:
    intermediate = intermediate_ca(ca)
    leaf = intermediate.issue("server", [SERVER], client=False)
    chain = Credentials((leaf.chain[0], intermediate.certificate), leaf.private_key)
    assert server_policy(ca).verify_server(der(chain), now()).dns_names == (SERVER,)

    client = intermediate.issue("client", [CLIENT_URI], server=False, key_type="rsa-2048")
    client_chain = [*der(client), intermediate.certificate.public_bytes(Encoding.DER)]
    assert client_policy(ca).verify_client(client_chain, now()).uris == (CLIENT_URI,)


def test_intermediate_missing_from_chain_is_unknown_ca(ca: CertificateAuthority) -> None:
    leaf = intermediate_ca(ca).issue("server", [SERVER], client=False)
    error = reject(lambda: server_policy(ca).verify_server(der(leaf), now()))
    assert error.alert is Alert.UNKNOWN_CA


def test_intermediate_as_trust_anchor(ca: CertificateAuthority) -> None:
    intermediate = intermediate_ca(ca)
    leaf = intermediate.issue("server", [SERVER], client=False)
    policy = PeerPolicy((intermediate.certificate,), ANY, SERVER)
    assert policy.verify_server(der(leaf), now()).common_name == "server"


def test_bytearray_chain_entries_are_accepted(ca: CertificateAuthority) -> None:
    creds = ca.issue("server", [SERVER], client=False)
    chain = [bytearray(d) for d in der(creds)]
    assert server_policy(ca).verify_server(chain, now()).dns_names == (SERVER,)  # type: ignore[arg-type]


# ------------------------------------------------------- remembered validations
# A validation is remembered per (chain, anchors, policy, name, role) for the span its path
# is valid in; each test below validates first, so the second answer comes from that memory.


def test_remembered_chain_still_expires_with_its_intermediate(ca: CertificateAuthority) -> None:
    intermediate = intermediate_ca(ca)  # valid 30 days; the leaf 825
    leaf = intermediate.issue("server", [SERVER], client=False)
    chain = [*der(leaf), intermediate.certificate.public_bytes(Encoding.DER)]
    policy = server_policy(ca)
    assert policy.verify_server(chain, now()).common_name == "server"
    error = reject(lambda: policy.verify_server(chain, now() + timedelta(days=40)))
    assert error.alert is Alert.UNKNOWN_CA  # the intermediate, not the leaf, ran out
    assert "not valid at validation time" in error.reason
    assert policy.verify_server(chain, now()).common_name == "server"


def test_remembered_chain_is_not_trusted_under_other_anchors(ca: CertificateAuthority) -> None:
    creds = ca.issue("server", [SERVER], client=False)
    assert server_policy(ca).verify_server(der(creds), now()).common_name == "server"
    other = CertificateAuthority.create("another CA")
    error = reject(lambda: server_policy(other).verify_server(der(creds), now()))
    assert error.alert is Alert.UNKNOWN_CA


def test_remembered_chain_meets_each_allow_list(ca: CertificateAuthority) -> None:
    creds = ca.issue("server", [SERVER], client=False)
    assert server_policy(ca).verify_server(der(creds), now()).common_name == "server"
    narrow = AllowList.of(["dns:other.qkdproxy.test"])
    error = reject(lambda: server_policy(ca, allow=narrow).verify_server(der(creds), now()))
    assert error.alert is Alert.ACCESS_DENIED


def test_remembered_chain_keeps_its_role_and_name(ca: CertificateAuthority) -> None:
    creds = ca.issue("server", [SERVER], client=False)
    assert server_policy(ca).verify_server(der(creds), now()).common_name == "server"
    error = reject(lambda: client_policy(ca).verify_client(der(creds), now()))
    assert error.alert is Alert.BAD_CERTIFICATE  # no clientAuth
    error = reject(
        lambda: server_policy(ca, "other.qkdproxy.test").verify_server(der(creds), now())
    )
    assert error.alert is Alert.BAD_CERTIFICATE


def test_a_huge_chain_is_validated_but_not_remembered(ca: CertificateAuthority) -> None:
    # Extra certificates the path does not use are no reason to refuse a chain, but a client
    # with any certificate from the CA (allowed or not) must not pin megabytes of them.
    creds = ca.issue("client", [CLIENT_URI], server=False)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "padding")])
    padding = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now() - timedelta(days=1))
        .not_valid_after(now() + timedelta(days=1))
        .add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.55555.1"), bytes(40_000)),
            critical=False,
        )
        .sign(key, hashes.SHA256())
        .public_bytes(Encoding.DER)
    )
    chain = [*der(creds), padding, padding]
    denied = client_policy(ca, allow=AllowList.of(["dns:nobody.qkdproxy.test"]))
    assert reject(lambda: denied.verify_client(chain, now())).alert is Alert.ACCESS_DENIED
    assert not any(key[-1] == tuple(chain) for key in verify._VALIDATED)
    small = der(creds)
    reject(lambda: denied.verify_client(small, now()))
    assert any(key[-1] == tuple(small) for key in verify._VALIDATED)


# ------------------------------------------------------------------------ rejections


def test_expired_leaf(ca: CertificateAuthority) -> None:
    creds = ca.issue("server", [SERVER], client=False, now=now() - timedelta(days=3), days=1)
    error = reject(lambda: server_policy(ca).verify_server(der(creds), now()))
    assert error.alert is Alert.CERTIFICATE_EXPIRED
    assert "validity" in error.reason


def test_expired_client_leaf(ca: CertificateAuthority) -> None:
    creds = ca.issue("client", [CLIENT_URI], server=False, now=now() - timedelta(days=3), days=1)
    error = reject(lambda: client_policy(ca).verify_client(der(creds), now()))
    assert error.alert is Alert.CERTIFICATE_EXPIRED


def test_not_yet_valid_leaf(ca: CertificateAuthority) -> None:
    creds = ca.issue("server", [SERVER], client=False, now=now() + timedelta(days=2), days=10)
    error = reject(lambda: server_policy(ca).verify_server(der(creds), now()))
    assert error.alert is Alert.CERTIFICATE_EXPIRED


def test_validity_uses_the_given_clock(ca: CertificateAuthority) -> None:
    creds = ca.issue("server", [SERVER], client=False, days=1)
    policy = server_policy(ca)
    assert policy.verify_server(der(creds), now() + timedelta(hours=12)).common_name == "server"
    error = reject(lambda: policy.verify_server(der(creds), now() + timedelta(days=2)))
    assert error.alert is Alert.CERTIFICATE_EXPIRED


def test_leaf_from_another_ca(ca: CertificateAuthority) -> None:
    other = CertificateAuthority.create("another CA")
    creds = other.issue("server", [SERVER], client=False)
    error = reject(lambda: server_policy(ca).verify_server(der(creds), now()))
    assert error.alert in (Alert.UNKNOWN_CA, Alert.BAD_CERTIFICATE)
    assert error.alert is Alert.UNKNOWN_CA  # what the code gives: "candidates exhausted"


def test_client_leaf_from_another_ca(ca: CertificateAuthority) -> None:
    other = CertificateAuthority.create("another CA")
    creds = other.issue("client", [CLIENT_URI], server=False)
    error = reject(lambda: client_policy(ca).verify_client(der(creds), now()))
    assert error.alert is Alert.UNKNOWN_CA


def test_wrong_server_name(ca: CertificateAuthority) -> None:
    creds = ca.issue("server", ["other.qkdproxy.test"], client=False)
    error = reject(lambda: server_policy(ca).verify_server(der(creds), now()))
    assert error.alert is Alert.BAD_CERTIFICATE
    assert "subjectAltName" in error.reason


def test_server_policy_without_server_name(ca: CertificateAuthority) -> None:
    creds = ca.issue("server", [SERVER], client=False)
    error = reject(lambda: client_policy(ca).verify_server(der(creds), now()))
    assert error.alert is Alert.INTERNAL_ERROR


@pytest.mark.parametrize("name", [SERVER + ".", "sérver.qkdproxy.test"])
def test_unusual_server_name_gives_identity_or_rejection(
    ca: CertificateAuthority, name: str
) -> None:
    creds = ca.issue("server", [SERVER], client=False)
    # Either outcome is fine (the name may match, or be refused with an alert); a bare
    # ValueError escaping the verifier (and becoming an alert-less HandshakeError) is not.
    with contextlib.suppress(PeerRejectedError):
        server_policy(ca, name).verify_server(der(creds), now())


@pytest.mark.parametrize("method", ["server", "client"])
def test_empty_chain(ca: CertificateAuthority, method: str) -> None:
    policy = server_policy(ca)
    verify = policy.verify_server if method == "server" else policy.verify_client
    error = reject(lambda: verify([], now()))
    assert error.alert is Alert.CERTIFICATE_REQUIRED


@pytest.mark.parametrize(
    "blob",
    [b"", b"not a certificate", b"\x30\x03\x02\x01\x01", b"\x30\x82\xff\xff" + b"\x00" * 8],
)
def test_malformed_der(ca: CertificateAuthority, blob: bytes) -> None:
    error = reject(lambda: server_policy(ca).verify_server([blob], now()))
    assert error.alert is Alert.BAD_CERTIFICATE


def test_malformed_intermediate(ca: CertificateAuthority) -> None:
    creds = ca.issue("client", [CLIENT_URI], server=False)
    error = reject(lambda: client_policy(ca).verify_client([*der(creds), b"junk"], now()))
    assert error.alert is Alert.BAD_CERTIFICATE


def test_chain_longer_than_limit(ca: CertificateAuthority) -> None:
    creds = ca.issue("server", [SERVER], client=False)
    filler = ca.certificate.public_bytes(Encoding.DER)
    too_long = [*der(creds), *[filler] * (MAX_CHAIN_DEPTH + 1)]
    error = reject(lambda: server_policy(ca).verify_server(too_long, now()))
    assert error.alert is Alert.BAD_CERTIFICATE
    assert "too long" in error.reason
    # At the limit, the extra (unused) certificates do not matter.
    at_limit = [*der(creds), *[filler] * MAX_CHAIN_DEPTH]
    assert server_policy(ca).verify_server(at_limit, now()).common_name == "server"


def test_server_only_certificate_used_as_client(ca: CertificateAuthority) -> None:
    creds = ca.issue("client", [CLIENT_URI], client=False)
    error = reject(lambda: client_policy(ca).verify_client(der(creds), now()))
    assert error.alert is Alert.BAD_CERTIFICATE
    assert "EKU" in error.reason


def test_client_only_certificate_used_as_server(ca: CertificateAuthority) -> None:
    creds = ca.issue("server", [SERVER], server=False)
    error = reject(lambda: server_policy(ca).verify_server(der(creds), now()))
    assert error.alert is Alert.BAD_CERTIFICATE


def test_ca_certificate_as_leaf(ca: CertificateAuthority) -> None:
    chain = [ca.certificate.public_bytes(Encoding.DER)]
    assert reject(lambda: client_policy(ca).verify_client(chain, now())).alert in (
        Alert.BAD_CERTIFICATE,
        Alert.UNKNOWN_CA,
    )


@pytest.mark.parametrize("method", ["server", "client"])
def test_no_trust_anchors(ca: CertificateAuthority, method: str) -> None:
    policy = PeerPolicy((), ANY, SERVER)
    creds = ca.issue("peer", [SERVER, CLIENT_URI])
    verify = policy.verify_server if method == "server" else policy.verify_client
    error = reject(lambda: verify(der(creds), now()))
    assert error.alert is Alert.UNKNOWN_CA


def test_peer_outside_allow_list(ca: CertificateAuthority) -> None:
    creds = ca.issue("client", ["spiffe://qkdproxy.test/intruder"], server=False)
    allow = AllowList.of([f"uri:{CLIENT_URI}"])
    error = reject(lambda: client_policy(ca, allow).verify_client(der(creds), now()))
    assert error.alert is Alert.ACCESS_DENIED
    assert "spiffe://qkdproxy.test/intruder" in error.reason

    server = ca.issue("server", [SERVER], client=False)
    deny = server_policy(ca, allow=AllowList.of(["dns:elsewhere.test"]))
    assert reject(lambda: deny.verify_server(der(server), now())).alert is Alert.ACCESS_DENIED


def test_empty_allow_list_denies_a_valid_peer(ca: CertificateAuthority) -> None:
    creds = ca.issue("server", [SERVER], client=False)
    error = reject(lambda: server_policy(ca, allow=AllowList()).verify_server(der(creds), now()))
    assert error.alert is Alert.ACCESS_DENIED


def test_chain_check_precedes_allow_list(ca: CertificateAuthority) -> None:
    """An allow-listed name in a certificate from an untrusted CA is still refused."""
    other = CertificateAuthority.create("another CA")
    creds = other.issue("client", [CLIENT_URI], server=False)
    allow = AllowList.of([f"uri:{CLIENT_URI}"])
    assert reject(lambda: client_policy(ca, allow).verify_client(der(creds), now())).alert is (
        Alert.UNKNOWN_CA
    )


def test_rejection_carries_alert_and_reason() -> None:
    error = PeerRejectedError(Alert.ACCESS_DENIED, "nope")
    assert error.alert is Alert.ACCESS_DENIED
    assert error.reason == "nope"
    assert str(error) == "nope"


# ------------------------------------------------------------------------ allow-lists


def rule(text: str) -> AllowRule:
    return AllowRule.parse(text)


def test_dns_exact() -> None:
    r = rule("dns:api.example.com")
    assert r.kind is RuleKind.DNS
    assert r.matches(identity(dns=("api.example.com",)))
    assert r.matches(identity(dns=("other.test", "API.Example.COM.")))
    assert not r.matches(identity(dns=("x.api.example.com",)))
    assert not r.matches(identity(cn="api.example.com"))
    assert not r.matches(identity(uris=("https://api.example.com",)))


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a.example.com", True),
        ("A.EXAMPLE.COM", True),
        ("web-1.example.com.", True),
        ("example.com", False),
        ("a.b.example.com", False),
        (".example.com", False),
        ("*.example.com", False),
        ("a.example.org", False),
        ("aexample.com", False),
        ("a.example.com.evil", False),
    ],
)
def test_dns_wildcard(name: str, expected: bool) -> None:
    assert rule("dns:*.example.com").matches(identity(dns=(name,))) is expected


def test_uri_exact() -> None:
    r = rule("uri:spiffe://td/ns/prod/sa/web")
    assert r.kind is RuleKind.URI
    assert r.matches(identity(uris=("spiffe://td/ns/prod/sa/web",)))
    assert not r.matches(identity(uris=("spiffe://td/ns/prod/sa/web/",)))
    assert not r.matches(identity(uris=("spiffe://td/ns/prod/sa",)))
    assert not r.matches(identity(dns=("spiffe://td/ns/prod/sa/web",)))


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("spiffe://td/ns/prod/sa/web", True),
        ("spiffe://td/ns/dev/sa/web", True),
        ("spiffe://td/ns//sa/web", False),
        ("spiffe://td/ns/a/b/sa/web", False),
        ("spiffe://td/ns/prod/sa/db", False),
        ("spiffe://other/ns/prod/sa/web", False),
        ("spiffe://td/ns/prod/sa/web/extra", False),
        ("spiffe://td/ns/prod/sa", False),
    ],
)
def test_uri_single_segment_wildcard(uri: str, expected: bool) -> None:
    assert rule("uri:spiffe://td/ns/*/sa/web").matches(identity(uris=(uri,))) is expected


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("spiffe://td/ns/a", True),
        ("spiffe://td/ns/a/b", True),
        ("spiffe://td/ns/a/b/c/d", True),
        ("spiffe://td/ns", False),
        ("spiffe://td/other/a", False),
        ("spiffe://other/ns/a", False),
    ],
)
def test_uri_trailing_double_star(uri: str, expected: bool) -> None:
    assert rule("uri:spiffe://td/ns/**").matches(identity(uris=(uri,))) is expected


def test_uri_wildcards_combined() -> None:
    r = rule("uri:spiffe://td/*/x/**")
    assert r.matches(identity(uris=("spiffe://td/ns/x/a/b",)))
    assert not r.matches(identity(uris=("spiffe://td//x/a",)))
    assert not r.matches(identity(uris=("spiffe://td/ns/x",)))


def test_uri_double_star_needs_a_non_empty_segment() -> None:
    assert not rule("uri:spiffe://td/ns/**").matches(identity(uris=("spiffe://td/ns/",)))


def test_cn_exact() -> None:
    r = rule("cn:qkdproxy client")
    assert r.kind is RuleKind.CN
    assert r.matches(identity(cn="qkdproxy client"))
    assert not r.matches(identity(cn="QKDPROXY CLIENT"))
    assert not r.matches(identity(cn="qkdproxy client 2"))
    assert not r.matches(identity(cn=None, dns=("qkdproxy client",)))


def test_rule_parse() -> None:
    assert rule("DNS:x.test") == AllowRule(RuleKind.DNS, "x.test")
    assert rule("uri:spiffe://td/a") == AllowRule(RuleKind.URI, "spiffe://td/a")
    assert rule("cn:a:b") == AllowRule(RuleKind.CN, "a:b")


@pytest.mark.parametrize(
    "text", ["", "dns", "dns:", ":x", "ip:127.0.0.1", "email:a@b", " dns:x", "spiffe://td/a"]
)
def test_rule_parse_errors(text: str) -> None:
    with pytest.raises(ValueError, match="allow rule"):
        AllowRule.parse(text)


def test_allow_list_of_rejects_bad_entry() -> None:
    with pytest.raises(ValueError, match="kind must be"):
        AllowList.of(["dns:a.test", "host:b.test"])


def test_allow_list_defaults_and_any_peer() -> None:
    peer = identity(cn="c", dns=("a.test",), uris=("spiffe://td/a",))
    assert not AllowList().permits(peer)
    assert not AllowList.of([]).permits(peer)
    assert AllowList(any_peer=True).permits(peer)
    assert AllowList(any_peer=True).permits(identity())
    assert AllowList.of(["dns:none.test", "uri:spiffe://td/a"]).permits(peer)
    assert not AllowList.of(["dns:none.test", "cn:d"]).permits(peer)


def test_describe_fallbacks() -> None:
    assert identity(cn="c", dns=("a.test",), uris=("u://x",)).describe() == "u://x"
    assert identity(cn="c", dns=("a.test",)).describe() == "a.test"
    assert identity(cn="c").describe() == "c"
    assert identity().describe() == "sha256:" + "0" * 16


def test_identity_of_certificate_without_san(ca: CertificateAuthority) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    start = now() - timedelta(minutes=1)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=1))
        .sign(ca.key, hashes.SHA256())
    )
    peer = PeerIdentity.from_certificate(cert)
    assert (peer.common_name, peer.dns_names, peer.uris) == (None, (), ())
    assert peer.describe().startswith("sha256:")


@given(pattern=st.text(max_size=40), name=st.text(max_size=40))
def test_rule_matching_never_raises(pattern: str, name: str) -> None:
    peer = identity(cn=name, dns=(name,), uris=(name,))
    for kind in RuleKind:
        result = AllowRule(kind, pattern).matches(peer)
        assert isinstance(result, bool)
        if kind is RuleKind.CN:
            assert result is (pattern == name)
        if "*" not in pattern and kind is RuleKind.URI:
            assert result is (pattern == name)


@given(
    pattern=st.lists(st.sampled_from(["*", "**", "a", "b", ""]), min_size=1, max_size=6),
    uri=st.lists(st.sampled_from(["a", "b", "", "*"]), max_size=7),
)
def test_uri_matching_never_raises_on_segment_soup(pattern: list[str], uri: list[str]) -> None:
    r = AllowRule(RuleKind.URI, "/".join(pattern))
    assert isinstance(r.matches(identity(uris=("/".join(uri),))), bool)


@given(text=st.text(max_size=60))
def test_rule_parse_raises_only_value_error(text: str) -> None:
    try:
        parsed = AllowRule.parse(text)
    except ValueError:
        return
    assert parsed.pattern
    assert text.lower().startswith(str(parsed.kind))


# ------------------------------------------------------------------ credential files


def pem_cert(creds: Credentials) -> bytes:
    return b"".join(c.public_bytes(Encoding.PEM) for c in creds.chain)


def pem_key(key: PrivateKey | ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.fixture
def leaf_files(ca: CertificateAuthority, tmp_path: Path) -> tuple[Credentials, Path, Path]:
    creds = ca.issue("server", [SERVER], client=False)
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    cert.write_bytes(pem_cert(creds))
    key.write_bytes(pem_key(creds.private_key))
    return creds, cert, key


def test_load_round_trip(leaf_files: tuple[Credentials, Path, Path]) -> None:
    creds, cert, key = leaf_files
    loaded = Credentials.load(cert, key)
    assert loaded.chain == creds.chain
    assert loaded.private_key.public_key() == creds.private_key.public_key()
    assert Credentials.load(str(cert), str(key)).chain == creds.chain


def test_load_chain_with_intermediate(ca: CertificateAuthority, tmp_path: Path) -> None:
    intermediate = intermediate_ca(ca)
    leaf = intermediate.issue("server", [SERVER], client=False)
    cert, key = tmp_path / "chain.pem", tmp_path / "leaf.key"
    cert.write_bytes(pem_cert(leaf) + intermediate.certificate.public_bytes(Encoding.PEM))
    key.write_bytes(pem_key(leaf.private_key))
    loaded = Credentials.load(cert, key)
    assert loaded.chain == (leaf.chain[0], intermediate.certificate)
    assert server_policy(ca).verify_server(der(loaded), now()).common_name == "server"


def test_load_missing_cert_file(leaf_files: tuple[Credentials, Path, Path], tmp_path: Path) -> None:
    _, _, key = leaf_files
    missing = tmp_path / "missing.pem"
    with pytest.raises(CredentialError, match=r"missing\.pem") as info:
        Credentials.load(missing, key)
    assert str(missing) in str(info.value)


def test_load_missing_key_file(leaf_files: tuple[Credentials, Path, Path], tmp_path: Path) -> None:
    _, cert, _ = leaf_files
    missing = tmp_path / "nokey.pem"
    with pytest.raises(CredentialError) as info:
        Credentials.load(cert, missing)
    assert str(missing) in str(info.value)


@pytest.mark.parametrize("content", [b"", b"hello, not PEM\n", b"\x00\xff" * 50])
def test_load_non_pem_cert_file(
    leaf_files: tuple[Credentials, Path, Path], tmp_path: Path, content: bytes
) -> None:
    _, _, key = leaf_files
    bad = tmp_path / "garbage.pem"
    bad.write_bytes(content)
    with pytest.raises(CredentialError) as info:
        Credentials.load(bad, key)
    assert str(bad) in str(info.value)


def test_load_non_pem_key_file(leaf_files: tuple[Credentials, Path, Path], tmp_path: Path) -> None:
    _, cert, _ = leaf_files
    bad = tmp_path / "garbage.key"
    bad.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    with pytest.raises(CredentialError) as info:
        Credentials.load(cert, bad)
    assert str(bad) in str(info.value)


def test_load_certificate_given_as_key(leaf_files: tuple[Credentials, Path, Path]) -> None:
    _, cert, _ = leaf_files
    with pytest.raises(CredentialError) as info:
        Credentials.load(cert, cert)
    assert str(cert) in str(info.value)


def test_load_key_not_matching_cert(
    ca: CertificateAuthority, leaf_files: tuple[Credentials, Path, Path], tmp_path: Path
) -> None:
    _, cert, _ = leaf_files
    other = tmp_path / "other.key"
    other.write_bytes(pem_key(ca.issue("x", ["x.test"]).private_key))
    with pytest.raises(CredentialError, match="does not match") as info:
        Credentials.load(cert, other)
    assert str(cert) in str(info.value)
    assert str(other) in str(info.value)


def test_load_ed25519_key(leaf_files: tuple[Credentials, Path, Path], tmp_path: Path) -> None:
    _, cert, _ = leaf_files
    ed = tmp_path / "ed25519.key"
    ed.write_bytes(pem_key(ed25519.Ed25519PrivateKey.generate()))
    with pytest.raises(CredentialError, match="RSA and ECDSA") as info:
        Credentials.load(cert, ed)
    assert str(ed) in str(info.value)


def test_load_unsupported_curve(ca: CertificateAuthority, tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256K1())
    start = now() - timedelta(minutes=1)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "k1")]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=1))
        .sign(ca.key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "k1.pem", tmp_path / "k1.key"
    cert_file.write_bytes(cert.public_bytes(Encoding.PEM))
    key_file.write_bytes(pem_key(key))
    with pytest.raises(CredentialError, match="secp256k1") as info:
        Credentials.load(cert_file, key_file)
    assert str(key_file) in str(info.value)


def test_credentials_constructor_checks(ca: CertificateAuthority) -> None:
    creds = ca.issue("x", ["x.test"])
    with pytest.raises(CredentialError, match="empty"):
        Credentials((), creds.private_key)
    with pytest.raises(CredentialError, match="does not match"):
        Credentials(creds.chain, ca.issue("y", ["y.test"]).private_key)
    with pytest.raises(CredentialError, match="RSA and ECDSA"):
        Credentials(creds.chain, ed25519.Ed25519PrivateKey.generate())  # type: ignore[arg-type]


def test_load_trust_anchors(ca: CertificateAuthority, tmp_path: Path) -> None:
    other = CertificateAuthority.create("second CA")
    bundle = tmp_path / "ca.pem"
    bundle.write_bytes(
        ca.certificate.public_bytes(Encoding.PEM) + other.certificate.public_bytes(Encoding.PEM)
    )
    assert load_trust_anchors(bundle) == (ca.certificate, other.certificate)

    empty = tmp_path / "empty.pem"
    empty.write_bytes(b"# no certificates here\n")
    with pytest.raises(CredentialError) as info:
        load_trust_anchors(empty)
    assert str(empty) in str(info.value)

    missing = tmp_path / "nope" / "ca.pem"
    with pytest.raises(CredentialError) as info:
        load_trust_anchors(missing)
    assert str(missing) in str(info.value)
