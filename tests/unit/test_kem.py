"""KEM backends: round trips, exact sizes, and malformed input rejected with KemError only."""

from __future__ import annotations

import contextlib
import sys

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given, settings
from hypothesis import strategies as st

from qkdproxy.core.kem import KemError, KemRegistry, UnavailableKem, default_registry
from qkdproxy.core.kem.cryptography_backend import cryptography_kems
from qkdproxy.core.kem.liboqs import probe_liboqs
from tests.conftest import LIBOQS, requires_liboqs

CRYPTO_KEMS = {kem.name: kem for kem in cryptography_kems()}
EXPECTED_SIZES = {
    "ML-KEM-768": (1184, 1088, 32),
    "ML-KEM-1024": (1568, 1568, 32),
    "X25519": (32, 32, 32),
    "P-256": (65, 65, 32),
    "P-384": (97, 97, 48),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_SIZES))
def test_round_trip_and_sizes(name: str) -> None:
    kem = CRYPTO_KEMS[name]
    private, public = kem.generate()
    ciphertext, secret = kem.encapsulate(public)
    sizes = (len(public), len(ciphertext), len(secret))
    assert sizes == EXPECTED_SIZES[name]
    assert (kem.sizes.public_key, kem.sizes.ciphertext, kem.sizes.shared_secret) == sizes
    assert kem.decapsulate(private, ciphertext) == secret
    assert kem.backend == "cryptography"


@pytest.mark.parametrize("name", sorted(EXPECTED_SIZES))
@pytest.mark.parametrize("delta", [-1, 1])
def test_wrong_lengths_are_kem_errors(name: str, delta: int) -> None:
    kem = CRYPTO_KEMS[name]
    private, public = kem.generate()
    with pytest.raises(KemError, match="expected"):
        kem.encapsulate(public[: len(public) + delta] + b"\x00" * max(delta, 0))
    ciphertext, _ = kem.encapsulate(public)
    with pytest.raises(KemError, match="expected"):
        kem.decapsulate(private, ciphertext[: len(ciphertext) + delta] + b"\x00" * max(delta, 0))


def test_x25519_all_zero_secret_is_refused() -> None:
    kem = CRYPTO_KEMS["X25519"]
    private, _ = kem.generate()
    # The identity point gives an all-zero secret, which RFC 8446 7.4.2 forbids.
    with pytest.raises(KemError):
        kem.decapsulate(private, bytes(32))


@pytest.mark.parametrize("name", ["P-256", "P-384"])
def test_ecdh_rejects_compressed_and_off_curve_points(name: str) -> None:
    kem = CRYPTO_KEMS[name]
    curve = ec.SECP256R1() if name == "P-256" else ec.SECP384R1()
    compressed = (
        ec.generate_private_key(curve)
        .public_key()
        .public_bytes(Encoding.X962, PublicFormat.CompressedPoint)
    )
    padded = compressed + bytes(kem.sizes.public_key - len(compressed))
    with pytest.raises(KemError):
        kem.encapsulate(padded)
    _, public = kem.generate()
    off_curve = public[:-1] + bytes([public[-1] ^ 1])
    with pytest.raises(KemError):
        kem.encapsulate(off_curve)


@pytest.mark.parametrize("name", sorted(EXPECTED_SIZES))
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_random_input_only_ever_raises_kem_error(name: str, data: st.DataObject) -> None:
    kem = CRYPTO_KEMS[name]
    length = data.draw(st.sampled_from([0, 1, kem.sizes.public_key, kem.sizes.ciphertext]))
    blob = data.draw(st.binary(min_size=length, max_size=length))
    private, _ = kem.generate()
    for operation in (lambda: kem.encapsulate(blob), lambda: kem.decapsulate(private, blob)):
        with contextlib.suppress(KemError):
            operation()


def test_mlkem_decapsulation_of_tampered_ciphertext_gives_a_different_secret() -> None:
    kem = CRYPTO_KEMS["ML-KEM-768"]
    private, public = kem.generate()
    ciphertext, secret = kem.encapsulate(public)
    tampered = bytes([ciphertext[0] ^ 0xFF]) + ciphertext[1:]
    assert kem.decapsulate(private, tampered) != secret


def test_registry_explains_what_is_missing() -> None:
    registry = KemRegistry(cryptography_kems(), "liboqs is not installed")
    found = registry.get("ML-KEM-768")
    assert not isinstance(found, UnavailableKem)
    missing = registry.get("BIKE-L1")
    assert isinstance(missing, UnavailableKem)
    assert "BIKE-L1" in missing.reason
    assert "liboqs is not installed" in missing.reason
    assert "ML-KEM-1024" in registry.names()


def test_first_backend_wins_for_a_name() -> None:
    first, second = cryptography_kems()[0], cryptography_kems()[0]
    registry = KemRegistry([first, second], "")
    assert registry.get(first.name) is first


def test_liboqs_probe_never_builds_when_the_library_is_missing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    """Importing oqs without its library would start a download and build: never do it."""
    monkeypatch.setenv("OQS_INSTALL_PATH", str(tmp_path))
    monkeypatch.setattr("ctypes.util.find_library", lambda name: None)
    was_loaded = "oqs" in sys.modules
    probe = probe_liboqs()
    assert probe.module is None
    assert "not found" in probe.reason or "not installed" in probe.reason
    assert ("oqs" in sys.modules) == was_loaded


@requires_liboqs
@pytest.mark.parametrize(
    "name", ["ML-KEM-512", "BIKE-L1", "HQC-128", "FrodoKEM-640-AES", "eFrodoKEM-640-AES"]
)
def test_liboqs_kems_round_trip(name: str) -> None:
    kem = default_registry().get(name)
    assert not isinstance(kem, UnavailableKem), kem
    private, public = kem.generate()
    ciphertext, secret = kem.encapsulate(public)
    assert kem.decapsulate(private, ciphertext) == secret
    assert len(public) == kem.sizes.public_key
    with pytest.raises(KemError):
        kem.encapsulate(public[:-1])


@requires_liboqs
def test_a_liboqs_secret_key_serves_one_decapsulation_only() -> None:
    # A second use used to touch freed memory and abort the process (double free).
    kem = default_registry().get("ML-KEM-512")
    assert not isinstance(kem, UnavailableKem), kem
    private, public = kem.generate()
    ciphertext, secret = kem.encapsulate(public)
    assert kem.decapsulate(private, ciphertext) == secret
    with pytest.raises(KemError, match="already used"):
        kem.decapsulate(private, ciphertext)
    with pytest.raises(KemError, match="not a liboqs private key"):
        kem.decapsulate(object(), ciphertext)
    unused, _ = kem.generate()
    del unused  # freed without a decapsulation, and without a crash


def test_default_registry_reports_liboqs_state() -> None:
    missing = default_registry().get("BIKE-L5")
    if LIBOQS.module is None:
        assert isinstance(missing, UnavailableKem)
        assert LIBOQS.reason in missing.reason
    else:
        assert not isinstance(missing, UnavailableKem)
