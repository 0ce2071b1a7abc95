"""The native engine's key schedule against RFC 8448 section 3 (the simple 1-RTT handshake,
TLS_AES_128_GCM_SHA256), and HKDF-Expand-Label against its plain RFC 5869 definition."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qkdproxy.core.tls.native.schedule import KeySchedule
from qkdproxy.core.tls.record_layer import CIPHER_SUITES, Direction
from qkdproxy.core.tls.records import hkdf_expand_label

H = bytes.fromhex
SHARED = H("8bd4054fb55b9d63fdfbacf9f04b9f0d35e6d63f537563efd46272900f89492d")
HELLO_HASH = H("860c06edc07858ee8e78f0e7428c58edd6b43f2ca3e6e95f02ed063cf0e1cad8")
FINISHED_HASH = H("9608102a0f1ccc6db6250b7b7e417b1a000eaada3daae4777a7686c9ff83df13")
CLIENT_HS = H("b3eddb126e067f35a780b3abf45e2d8f3b1a950738f52e9600746a0e27a55a21")
SERVER_HS = H("b67b7d690cc16c4e75e54213cb2d37b4e9c912bcded9105d42befd59d391ad38")
MAIN = H("18df06843d13a08bf2a449844c5f8a478001bc4d4c627984d5a41da8d0402919")
CLIENT_AP = H("9e40646ce79a7f9dc05af8889bce6552875afa0b06df0087f792ebb7c17504a5")
SERVER_AP = H("a11af9f05531f856ad47116b45a950328204b4f44bfb6b3a4b4f1f3fcb631643")


def test_the_secrets_of_rfc_8448_section_3() -> None:
    schedule = KeySchedule("sha256", SHARED)
    assert schedule.handshake_secrets(HELLO_HASH) == (CLIENT_HS, SERVER_HS)
    assert schedule.main == MAIN
    assert schedule.application_secrets(FINISHED_HASH) == (CLIENT_AP, SERVER_AP)


def test_the_handshake_keys_and_finished_key_of_rfc_8448_section_3() -> None:
    suite = CIPHER_SUITES[0x1301]
    assert hkdf_expand_label(SERVER_HS, b"key", 16, "sha256") == H(
        "3fce516009c21727d0f2e4e86ee403bc"
    )
    assert hkdf_expand_label(SERVER_HS, b"iv", 12, "sha256") == H("5d313eb2671276ee13000b30")
    assert hkdf_expand_label(CLIENT_HS, b"key", 16, "sha256") == H(
        "dbfaa693d1762c5b666af5d950258d01"
    )
    assert Direction(suite, CLIENT_HS).keys.iv == int.from_bytes(
        H("5bd3c71b836e0b76bb73265f"), "big"
    )
    finished_key = H("008d3b66f816ea559f96b537e885c31fc068bf492c652f01f288a1d8cdc19fc8")
    assert hkdf_expand_label(SERVER_HS, b"finished", 32, "sha256") == finished_key
    transcript = hashlib.sha256(b"any transcript").digest()
    expected = hmac.digest(finished_key, transcript, "sha256")
    assert KeySchedule("sha256", SHARED).finished(SERVER_HS, transcript) == expected


def plain_expand_label(
    secret: bytes, label: bytes, length: int, hash_name: str, context: bytes
) -> bytes:
    """RFC 8446 7.1 over RFC 5869 2.3, block by block, with nothing precomputed."""
    full = b"tls13 " + label
    info = length.to_bytes(2, "big") + bytes([len(full)]) + full + bytes([len(context)]) + context
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.digest(secret, block + info + bytes([counter]), hash_name)
        out += block
        counter += 1
    return out[:length]


@pytest.mark.parametrize("hash_name", ["sha256", "sha384"])
@given(
    secret=st.binary(min_size=1, max_size=64),
    label=st.sampled_from([b"key", b"iv", b"derived", b"finished", b"traffic upd", b"x" * 40]),
    length=st.integers(min_value=1, max_value=200),
    context=st.binary(max_size=64),
)
def test_expand_label_equals_its_definition(
    hash_name: str, secret: bytes, label: bytes, length: int, context: bytes
) -> None:
    """One-block outputs take a shortcut and labels are cached: the same bytes anyway,
    including lengths that need several blocks."""
    assert hkdf_expand_label(secret, label, length, hash_name, context) == plain_expand_label(
        secret, label, length, hash_name, context
    )
