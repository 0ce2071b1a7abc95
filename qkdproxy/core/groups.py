"""TLS 1.3 key-exchange groups: names, code points and the KEMs they are built from.

The QKD-KEM groups copy the reference OpenSSL provider (oqs-provider code points with the
0x02 prefix replaced by 0x30). Every group is an ordered list of KEM components whose wire
values are concatenated; QKD groups add a 16-byte key id to each key share and a 32-byte QKD
key at the end of the shared secret.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from enum import Enum

from qkdproxy.core.errors import SettingError


class GroupKind(Enum):
    """What feeds the group's shared secret."""

    CLASSICAL = "classical"
    PQ = "pq"
    PQ_HYBRID = "pq-hybrid"
    QKD_KEM = "qkd-kem"
    QKD_TRIPLE = "qkd-triple"


@dataclass(frozen=True, slots=True)
class GroupSpec:
    """One named group: wire code point, KEM components in wire order, and QKD or not."""

    name: str
    code_point: int
    components: tuple[str, ...]
    kind: GroupKind
    tlslite_name: str

    @property
    def qkd(self) -> bool:
        """True when a QKD key id travels in the key shares and a QKD key ends the secret."""
        return self.kind in (GroupKind.QKD_KEM, GroupKind.QKD_TRIPLE)

    @property
    def post_quantum(self) -> bool:
        """True when at least one component is a post-quantum KEM."""
        return self.kind is not GroupKind.CLASSICAL


def _qkd(name: str, code_point: int, kem: str) -> GroupSpec:
    return GroupSpec(name, code_point, (kem,), GroupKind.QKD_KEM, name)


_REFERENCE_QKD_GROUPS = (
    _qkd("qkd_frodo640aes", 0x3000, "FrodoKEM-640-AES"),
    _qkd("qkd_frodo640shake", 0x3001, "FrodoKEM-640-SHAKE"),
    _qkd("qkd_frodo976aes", 0x3002, "FrodoKEM-976-AES"),
    _qkd("qkd_frodo976shake", 0x3003, "FrodoKEM-976-SHAKE"),
    _qkd("qkd_frodo1344aes", 0x3004, "FrodoKEM-1344-AES"),
    _qkd("qkd_frodo1344shake", 0x3005, "FrodoKEM-1344-SHAKE"),
    _qkd("qkd_kyber512", 0x303A, "Kyber512"),
    _qkd("qkd_kyber768", 0x303C, "Kyber768"),
    _qkd("qkd_kyber1024", 0x303D, "Kyber1024"),
    _qkd("qkd_mlkem512", 0x304A, "ML-KEM-512"),
    _qkd("qkd_mlkem768", 0x3768, "ML-KEM-768"),
    _qkd("qkd_mlkem1024", 0x3024, "ML-KEM-1024"),
    _qkd("qkd_bikel1", 0x3041, "BIKE-L1"),
    _qkd("qkd_bikel3", 0x3042, "BIKE-L3"),
    _qkd("qkd_bikel5", 0x3043, "BIKE-L5"),
    _qkd("qkd_hqc128", 0x3044, "HQC-128"),
    _qkd("qkd_hqc192", 0x3045, "HQC-192"),
    _qkd("qkd_hqc256", 0x3046, "HQC-256"),
    _qkd("qkd_efrodo640aes", 0xFE00, "eFrodoKEM-640-AES"),
    _qkd("qkd_efrodo640shake", 0xFE01, "eFrodoKEM-640-SHAKE"),
    _qkd("qkd_efrodo976aes", 0xFE02, "eFrodoKEM-976-AES"),
    _qkd("qkd_efrodo976shake", 0xFE03, "eFrodoKEM-976-SHAKE"),
    _qkd("qkd_efrodo1344aes", 0xFE04, "eFrodoKEM-1344-AES"),
    _qkd("qkd_efrodo1344shake", 0xFE05, "eFrodoKEM-1344-SHAKE"),
)

_STANDARD_GROUPS = (
    # draft-ietf-tls-ecdhe-mlkem: ML-KEM first for X25519MLKEM768, ECDH first for the NIST ones.
    GroupSpec(
        "X25519MLKEM768", 0x11EC, ("ML-KEM-768", "X25519"), GroupKind.PQ_HYBRID, "x25519mlkem768"
    ),
    GroupSpec(
        "SecP256r1MLKEM768",
        0x11EB,
        ("P-256", "ML-KEM-768"),
        GroupKind.PQ_HYBRID,
        "secp256r1mlkem768",
    ),
    GroupSpec(
        "SecP384r1MLKEM1024",
        0x11ED,
        ("P-384", "ML-KEM-1024"),
        GroupKind.PQ_HYBRID,
        "secp384r1mlkem1024",
    ),
    # draft-ietf-tls-mlkem: pure ML-KEM, the PQ-only counterpart of qkd_mlkem768/1024
    # (the paper's "OQS provider" column).
    GroupSpec("MLKEM768", 0x0201, ("ML-KEM-768",), GroupKind.PQ, "mlkem768"),
    GroupSpec("MLKEM1024", 0x0202, ("ML-KEM-1024",), GroupKind.PQ, "mlkem1024"),
    GroupSpec("x25519", 0x001D, ("X25519",), GroupKind.CLASSICAL, "x25519"),
    GroupSpec("secp256r1", 0x0017, ("P-256",), GroupKind.CLASSICAL, "secp256r1"),
    GroupSpec("secp384r1", 0x0018, ("P-384",), GroupKind.CLASSICAL, "secp384r1"),
)

# The paper's future work: classical + PQ + QKD. Private-use code point (RFC 8446 4.2.7),
# clear of the reference's 0xFE00-0xFE05. Wire order: ML-KEM-768, X25519, key id; secret:
# ML-KEM-768 secret || X25519 secret || QKD key.
TRIPLE_HYBRID = GroupSpec(
    "qkd_x25519mlkem768",
    0xFE30,
    ("ML-KEM-768", "X25519"),
    GroupKind.QKD_TRIPLE,
    "qkd_x25519mlkem768",
)

ALL_GROUPS: tuple[GroupSpec, ...] = (*_REFERENCE_QKD_GROUPS, TRIPLE_HYBRID, *_STANDARD_GROUPS)


class GroupError(SettingError):
    """An unknown group name or an invalid code-point override."""


class GroupTable:
    """Lookup of groups by name (case-insensitive) and by code point."""

    def __init__(self, groups: Iterable[GroupSpec]) -> None:
        self._by_name: dict[str, GroupSpec] = {}
        self._by_code: dict[int, GroupSpec] = {}
        for group in groups:
            if not 0 < group.code_point <= 0xFFFF:
                raise GroupError(f"{group.name}: code point {group.code_point:#x} is not 16-bit")
            clash = self._by_code.get(group.code_point)
            if clash is not None:
                raise GroupError(
                    f"{group.name} and {clash.name} share code point {group.code_point:#06x}"
                )
            self._by_name[group.name.lower()] = group
            self._by_code[group.code_point] = group

    def all(self) -> list[GroupSpec]:
        """Every group, in table order."""
        return list(self._by_code.values())

    def by_name(self, name: str) -> GroupSpec:
        """The group called ``name`` (any case); :class:`GroupError` if unknown."""
        group = self._by_name.get(name.lower())
        if group is None:
            raise GroupError(f"unknown group {name!r}")
        return group

    def by_code(self, code_point: int) -> GroupSpec | None:
        """The group on the wire as ``code_point``, if any."""
        return self._by_code.get(code_point)

    def with_overrides(self, overrides: Mapping[str, int]) -> GroupTable:
        """A copy where the named groups use other code points (as the reference allows)."""
        changed = {self.by_name(name).name: code for name, code in overrides.items()}
        return GroupTable(
            replace(group, code_point=changed.get(group.name, group.code_point))
            for group in self._by_code.values()
        )


DEFAULT_GROUPS = GroupTable(ALL_GROUPS)
