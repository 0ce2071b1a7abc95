"""Group table and wire layout: the reference's code points, byte-exact shares and secrets."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519

from qkdproxy.core.groups import DEFAULT_GROUPS, TRIPLE_HYBRID, GroupError, GroupKind, GroupTable
from qkdproxy.core.hybrid import (
    KEY_ID_SIZE,
    GroupUnavailableError,
    HybridKem,
    attach_key_id,
    detach_key_id,
    resolve,
    with_qkd_key,
)
from qkdproxy.core.kem import KemError, KemRegistry, default_registry
from qkdproxy.core.kem.base import KemSizes
from qkdproxy.core.kem.cryptography_backend import MlKem, X25519Kem

# From ../shared/reference/qkd-kem-wire-format.md (the reference OpenSSL provider).
REFERENCE_CODE_POINTS = {
    "qkd_frodo640aes": 0x3000, "qkd_frodo640shake": 0x3001,
    "qkd_frodo976aes": 0x3002, "qkd_frodo976shake": 0x3003,
    "qkd_frodo1344aes": 0x3004, "qkd_frodo1344shake": 0x3005,
    "qkd_kyber512": 0x303A, "qkd_kyber768": 0x303C, "qkd_kyber1024": 0x303D,
    "qkd_mlkem512": 0x304A, "qkd_mlkem768": 0x3768, "qkd_mlkem1024": 0x3024,
    "qkd_bikel1": 0x3041, "qkd_bikel3": 0x3042, "qkd_bikel5": 0x3043,
    "qkd_hqc128": 0x3044, "qkd_hqc192": 0x3045, "qkd_hqc256": 0x3046,
    "qkd_efrodo640aes": 0xFE00, "qkd_efrodo640shake": 0xFE01,
    "qkd_efrodo976aes": 0xFE02, "qkd_efrodo976shake": 0xFE03,
    "qkd_efrodo1344aes": 0xFE04, "qkd_efrodo1344shake": 0xFE05,
}  # fmt: skip
STANDARD_CODE_POINTS = {
    "X25519MLKEM768": 0x11EC, "SecP256r1MLKEM768": 0x11EB, "SecP384r1MLKEM1024": 0x11ED,
    "x25519": 0x001D, "secp256r1": 0x0017, "secp384r1": 0x0018,
}  # fmt: skip

SEED = bytes(range(64))
KEY_ID = bytes.fromhex("00112233445566778899aabbccddeeff")
QKD_KEY = bytes(range(100, 132))


def seeded_mlkem768() -> MlKem:
    """Real ML-KEM-768 whose key generation is pinned to SEED, for known-answer vectors."""
    return MlKem(
        "ML-KEM-768",
        KemSizes(1184, 1088, 32),
        lambda: mlkem.MLKEM768PrivateKey.from_seed_bytes(SEED),
        mlkem.MLKEM768PublicKey.from_public_bytes,
    )


def test_every_reference_group_has_its_code_point() -> None:
    for name, code in {**REFERENCE_CODE_POINTS, **STANDARD_CODE_POINTS}.items():
        group = DEFAULT_GROUPS.by_name(name)
        assert group.code_point == code, name
        assert DEFAULT_GROUPS.by_code(code) == group
    assert {g.name for g in DEFAULT_GROUPS.all() if g.kind is GroupKind.QKD_KEM} == set(
        REFERENCE_CODE_POINTS
    )


def test_triple_hybrid_is_private_use_and_documented_order() -> None:
    assert 0xFE00 <= TRIPLE_HYBRID.code_point <= 0xFEFF
    assert TRIPLE_HYBRID.code_point not in REFERENCE_CODE_POINTS.values()
    assert TRIPLE_HYBRID.components == ("ML-KEM-768", "X25519")
    assert TRIPLE_HYBRID.qkd


def test_names_are_case_insensitive_and_unknown_names_fail() -> None:
    assert DEFAULT_GROUPS.by_name("x25519mlkem768").name == "X25519MLKEM768"
    with pytest.raises(GroupError, match="unknown group"):
        DEFAULT_GROUPS.by_name("qkd_nope")


def test_code_point_overrides() -> None:
    table = DEFAULT_GROUPS.with_overrides({"qkd_mlkem768": 0x3769})
    assert table.by_name("qkd_mlkem768").code_point == 0x3769
    assert table.by_code(0x3768) is None
    assert DEFAULT_GROUPS.by_name("qkd_mlkem768").code_point == 0x3768
    with pytest.raises(GroupError, match="share code point"):
        DEFAULT_GROUPS.with_overrides({"qkd_mlkem768": 0x11EC})
    with pytest.raises(GroupError, match="16-bit"):
        DEFAULT_GROUPS.with_overrides({"qkd_mlkem768": 0x10000})
    with pytest.raises(GroupError, match="unknown group"):
        DEFAULT_GROUPS.with_overrides({"nope": 1})


def test_duplicate_code_points_are_refused() -> None:
    group = DEFAULT_GROUPS.by_name("x25519")
    with pytest.raises(GroupError):
        GroupTable([group, group])


def test_unavailable_group_names_the_missing_kem() -> None:
    registry = KemRegistry([], "no backend here")
    with pytest.raises(GroupUnavailableError, match=r"ML-KEM-768.*no backend here"):
        resolve(DEFAULT_GROUPS.by_name("qkd_mlkem768"), registry)


def test_qkd_mlkem768_sizes_match_the_wire_note() -> None:
    hybrid = resolve(DEFAULT_GROUPS.by_name("qkd_mlkem768"), default_registry())
    assert (hybrid.client_share_size, hybrid.server_share_size, hybrid.secret_size) == (
        1200,
        1104,
        64,
    )


def test_vector_qkd_mlkem768_layout_byte_for_byte() -> None:
    """pq_public || key_id, pq_ciphertext || key_id, secret pq_ss || qkd_key."""
    hybrid = HybridKem(DEFAULT_GROUPS.by_name("qkd_mlkem768"), (seeded_mlkem768(),))
    private, public = hybrid.generate()
    share = attach_key_id(public, KEY_ID)
    assert len(share) == 1200
    assert share[:8].hex() == "298aa10d423c8dda"
    assert share[-KEY_ID_SIZE:] == KEY_ID
    assert (
        hashlib.sha256(share).hexdigest()
        == "e07701b5319992047b83d35f9c34d6aae6e9a3c7ff825e7ed7200df094b13434"
    )
    body, key_id = detach_key_id(share, hybrid.public_size)
    ciphertext, pq_secret = hybrid.encapsulate(body)
    server_share = attach_key_id(ciphertext, key_id)
    server_secret = with_qkd_key(pq_secret, QKD_KEY)
    assert len(server_share) == 1104 and server_share[1088:] == KEY_ID
    assert server_secret[:32] == pq_secret and server_secret[32:] == QKD_KEY
    client_ct, _ = detach_key_id(server_share, hybrid.ciphertext_size)
    assert with_qkd_key(hybrid.decapsulate(private, client_ct), QKD_KEY) == server_secret
    # Independent check with the library directly: the PQ part is plain ML-KEM-768.
    direct = mlkem.MLKEM768PrivateKey.from_seed_bytes(SEED)
    assert direct.decapsulate(client_ct) == pq_secret


def test_vector_triple_hybrid_order_mlkem_x25519_key_id() -> None:
    fixed_x = x25519.X25519PrivateKey.from_private_bytes(bytes(range(32)))

    class FixedX25519(X25519Kem):
        def generate(self) -> tuple[object, bytes]:
            return fixed_x, fixed_x.public_key().public_bytes_raw()

    hybrid = HybridKem(TRIPLE_HYBRID, (seeded_mlkem768(), FixedX25519()))
    _, public = hybrid.generate()
    share = attach_key_id(public, KEY_ID)
    assert len(share) == 1184 + 32 + 16
    assert (
        hashlib.sha256(share).hexdigest()
        == "ea03a07fbc230a7b155449962d762abdaa6e9e3e60c3d7e36032bc4850f92c1a"
    )
    ciphertext, pq_secret = hybrid.encapsulate(public)
    secret = with_qkd_key(pq_secret, QKD_KEY)
    assert len(secret) == 32 + 32 + 32
    mlkem_ss = mlkem.MLKEM768PrivateKey.from_seed_bytes(SEED).decapsulate(ciphertext[:1088])
    x_ss = fixed_x.exchange(x25519.X25519PublicKey.from_public_bytes(ciphertext[1088:]))
    assert secret == mlkem_ss + x_ss + QKD_KEY


def test_standard_hybrid_orders_follow_the_ietf_draft() -> None:
    registry = default_registry()
    x = resolve(DEFAULT_GROUPS.by_name("X25519MLKEM768"), registry)
    p = resolve(DEFAULT_GROUPS.by_name("SecP256r1MLKEM768"), registry)
    assert [k.name for k in x.components] == ["ML-KEM-768", "X25519"]
    assert [k.name for k in p.components] == ["P-256", "ML-KEM-768"]
    _, public = p.generate()
    assert public[0] == 0x04 and len(public) == 65 + 1184
    assert not x.group.qkd and x.client_share_size == 1216


def test_detach_and_attach_are_strict() -> None:
    with pytest.raises(KemError):
        detach_key_id(bytes(1199), 1184)
    with pytest.raises(ValueError, match="16 bytes"):
        attach_key_id(b"x", bytes(15))
    with pytest.raises(ValueError, match="32 bytes"):
        with_qkd_key(b"x", bytes(31))


def test_split_rejects_wrong_total_length() -> None:
    hybrid = resolve(DEFAULT_GROUPS.by_name("X25519MLKEM768"), default_registry())
    private, public = hybrid.generate()
    with pytest.raises(KemError):
        hybrid.encapsulate(public + b"\x00")
    with pytest.raises(KemError):
        hybrid.decapsulate(private, bytes(hybrid.ciphertext_size - 1))
