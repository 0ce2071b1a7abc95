"""The cheaper tlslite steps of the glue (docs/PERFORMANCE.md) give tlslite's results."""

from __future__ import annotations

import hashlib
import hmac
import random

import pytest
import tlslite.recordlayer
import tlslite.tlsconnection
import tlslite.x509
from cryptography.hazmat.primitives.serialization import Encoding
from tlslite.constants import ExtensionType, GroupName, SignatureScheme
from tlslite.errors import TLSInternalError
from tlslite.extensions import ClientKeyShareExtension, SupportedGroupsExtension
from tlslite.handshakehelpers import HandshakeHelpers
from tlslite.messages import ClientHello, HelloMessage, KeyShareEntry
from tlslite.utils.codec import Parser

from qkdproxy.core.groups import DEFAULT_GROUPS, GroupKind, GroupSpec
from qkdproxy.core.tls import tlslite_glue as glue
from qkdproxy.core.tls.records import hkdf_expand_label
from qkdproxy.sim.pki import CertificateAuthority

glue.install([])


def test_key_derivations_match_tlslite() -> None:
    glue._check_fast_kdf()  # against tlslite's own functions, kept aside
    secret, label = bytes(range(32)), b"derived"
    ours = glue._hkdf_expand_label(secret, label, b"ctx", 70, "sha256")
    assert ours == glue._TLSLITE_KDF["HKDF_expand_label"](
        bytearray(secret), bytearray(label), bytearray(b"ctx"), 70, "sha256"
    )
    assert bytes(ours) == hkdf_expand_label(secret, label, 70, "sha256", b"ctx")
    assert glue._secure_hmac(b"k", b"m", "sha384") == hmac.digest(b"k", b"m", "sha384")


def test_every_tlslite_module_uses_our_key_derivations() -> None:
    assert tlslite.tlsconnection.HKDF_expand_label is glue._hkdf_expand_label
    assert tlslite.tlsconnection.derive_secret is glue._derive_secret
    assert tlslite.tlsconnection.secureHMAC is glue._secure_hmac
    assert tlslite.recordlayer.HKDF_expand_label is glue._hkdf_expand_label


def test_transcript_digests_match_tlslite() -> None:
    glue._check_transcript()
    transcript = glue._TranscriptHashes()
    transcript.update(b"hello")
    copied = transcript.copy()
    transcript.update(b" more")
    assert copied.digest("sha256") == hashlib.sha256(b"hello").digest()
    assert transcript.digest("sha512") == hashlib.sha512(b"hello more").digest()
    assert transcript.digest("intrinsic") == b"hello more"
    with pytest.raises(ValueError, match="Unknown digest"):
        transcript.digest("sha3_256")


def test_parser_reads_like_tlslite_on_hostile_input() -> None:
    glue._check_parser()
    assert Parser.get is glue._parser_get  # installed
    rng = random.Random(16)
    for _ in range(3000):
        data = bytes(rng.randrange(256) if rng.random() < 0.7 else rng.choice((0, 1, 2, 255))
                     for _ in range(rng.randrange(0, 12)))  # fmt: skip
        start = rng.randrange(0, len(data) + 2)
        for name, args in (
            ("get", (rng.randrange(0, 5),)),
            ("getVarBytes", (rng.randrange(1, 4),)),
            ("getVarList", (rng.randrange(0, 4), rng.randrange(1, 3))),
            ("getVarTupleList", (rng.randrange(1, 3), rng.randrange(1, 3), rng.randrange(1, 3))),
        ):
            outcomes = []
            for method in (glue._tlslite_parser[name], glue._FAST_PARSER[name]):
                parser = Parser(bytearray(data))
                parser.index = start
                outcomes.append(glue._parser_outcome_from(method, parser, args))
            assert outcomes[0] == outcomes[1], (name, data, start, args)


def test_parser_check_catches_a_difference(monkeypatch: pytest.MonkeyPatch) -> None:
    def lenient(self: Parser, length: int) -> int:  # no bounds check: reads short
        value = int.from_bytes(self.bytes[self.index : self.index + length], "big")
        self.index += length
        return value

    monkeypatch.setitem(glue._FAST_PARSER, "get", lenient)
    with pytest.raises(glue.SelfTestError, match=r"Parser\.get "):
        glue._check_parser()


def _hello(share_sizes: list[int]) -> ClientHello:
    shares = [KeyShareEntry().create(29 + i, bytearray(n)) for i, n in enumerate(share_sizes)]
    ext = ClientKeyShareExtension().create(shares)
    return ClientHello().create((3, 3), bytearray(32), bytearray(0), [0x1301], extensions=[ext])


@pytest.mark.parametrize(
    "sizes", [[32], [200], [300], [470], [480], [511], [512], [256, 300], [1184]]
)
def test_client_hello_padding_as_tlslite(sizes: list[int]) -> None:
    assert HandshakeHelpers.alignClientHelloPadding is glue._align_client_hello_padding
    theirs, ours = _hello(sizes), _hello(sizes)
    glue._tlslite_align_padding(theirs)
    glue._align_client_hello_padding(ours)
    assert ours.write() == theirs.write()


def test_extension_lookup_as_tlslite() -> None:
    original = glue._tlslite_get_extension
    assert HelloMessage.getExtension is glue._get_extension
    one, two = SupportedGroupsExtension().create([29]), ClientKeyShareExtension().create([])
    for extensions in (None, [], [one], [one, two], [two, one]):
        hello = _hello([32])
        hello.extensions = extensions
        for ext_type in (ExtensionType.supported_groups, ExtensionType.key_share, 0):
            assert glue._get_extension(hello, ext_type) is original(hello, ext_type)
    hello.extensions = [one, two, SupportedGroupsExtension().create([23])]
    for lookup in (original, glue._get_extension):
        with pytest.raises(TLSInternalError, match="Multiple extensions"):
            lookup(hello, ExtensionType.supported_groups)


def test_a_long_client_hello_is_not_serialised_for_padding(monkeypatch: pytest.MonkeyPatch) -> None:
    hello = _hello([1184])
    monkeypatch.setattr(hello, "write", lambda: pytest.fail("serialised"))
    glue._align_client_hello_padding(hello)
    assert [e.extType for e in hello.extensions] == [ExtensionType.key_share]


def test_certificates_are_parsed_once_and_stay_separate() -> None:
    ca = CertificateAuthority.create("parse-once CA")
    der = ca.issue("server", ["parse.qkdproxy.test"], client=False).chain[0]
    raw = der.public_bytes(Encoding.DER)
    first = tlslite.x509.X509().parseBinary(bytearray(raw))
    second = tlslite.x509.X509().parseBinary(raw)
    assert raw in glue._parsed
    assert vars(first).keys() == vars(second).keys()
    assert (first.subject, first.certAlg, first.sigalg) == (
        second.subject,
        second.certAlg,
        second.sigalg,
    )
    assert first.bytes == second.bytes and first.bytes is not second.bytes
    with pytest.raises(SyntaxError):
        tlslite.x509.X509().parseBinary(bytearray(raw[:40]))  # malformed: never remembered
    assert raw[:40] not in glue._parsed


def test_code_point_names_follow_group_registration() -> None:
    assert SignatureScheme.toRepr((4, 3)) == "ecdsa_secp256r1_sha256"
    assert GroupName.toRepr(0xFEE7) is None  # remembered as unknown...
    group = GroupSpec("cost_test_group", 0xFEE7, ("X25519",), GroupKind.CLASSICAL, "x25519")
    name = glue.tlslite_group_name(group)
    assert GroupName.toRepr(0xFEE7) == name  # ...until a group is registered


def test_extension_payload_attributes() -> None:
    extension = SupportedGroupsExtension().create([29, 23])
    assert extension.groups == [29, 23]
    extension.groups = [24]
    assert extension.extData == bytearray(b"\x00\x02\x00\x18")
    with pytest.raises(AttributeError, match="has no attribute 'curves'"):
        _ = extension.curves


def test_settings_are_shared_but_their_validated_copies_are_not() -> None:
    group = DEFAULT_GROUPS.by_name("X25519MLKEM768")
    settings = glue.make_settings([group], group)
    assert glue.make_settings([group], group) is settings
    first, second = settings.validate(), settings.validate()
    first.cipherNames.append("rc4")
    first.dsaSigHashes = []
    assert "rc4" not in second.cipherNames and "rc4" not in settings.validate().cipherNames
    assert second.dsaSigHashes == settings.validate().dsaSigHashes
