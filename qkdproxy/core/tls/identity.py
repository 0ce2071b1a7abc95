"""Peer identities taken from verified certificates, and allow-lists over them."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """The names a verified peer certificate carries."""

    common_name: str | None
    dns_names: tuple[str, ...]
    uris: tuple[str, ...]
    fingerprint_sha256: str

    @classmethod
    def from_certificate(cls, cert: x509.Certificate) -> PeerIdentity:
        """Read CN, DNS SANs and URI SANs from a leaf certificate."""
        cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        common_name = str(cns[0].value) if cns else None
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            dns = tuple(san.get_values_for_type(x509.DNSName))
            uris = tuple(san.get_values_for_type(x509.UniformResourceIdentifier))
        except x509.ExtensionNotFound:
            dns, uris = (), ()
        return cls(common_name, dns, uris, cert.fingerprint(hashes.SHA256()).hex())

    def describe(self) -> str:
        """A short, log-safe label: the first URI SAN, else DNS SAN, else CN."""
        for value in (*self.uris, *self.dns_names):
            return value
        return self.common_name or f"sha256:{self.fingerprint_sha256[:16]}"


class RuleKind(StrEnum):
    """Which certificate name a rule matches."""

    DNS = "dns"
    URI = "uri"
    CN = "cn"


@dataclass(frozen=True, slots=True)
class AllowRule:
    """One allow-list entry.

    ``dns``: exact, or ``*.example.com`` for exactly one extra leftmost label.
    ``uri``: exact, or SPIFFE-style wildcards: ``*`` is one path segment, a final ``**``
    any number (at least one) of trailing segments.
    ``cn``: exact match of the subject common name.
    """

    kind: RuleKind
    pattern: str

    @classmethod
    def parse(cls, text: str) -> AllowRule:
        """Parse ``kind:pattern`` (e.g. ``uri:spiffe://prod/ns/*/sa/web``)."""
        kind, sep, pattern = text.partition(":")
        if not sep or not pattern:
            raise ValueError(f"allow rule {text!r} must look like dns:NAME, uri:URI or cn:NAME")
        try:
            return cls(RuleKind(kind.lower()), pattern)
        except ValueError:
            raise ValueError(f"allow rule {text!r}: kind must be dns, uri or cn") from None

    def matches(self, peer: PeerIdentity) -> bool:
        """True if the peer carries a name this rule admits."""
        if self.kind is RuleKind.CN:
            return peer.common_name == self.pattern
        if self.kind is RuleKind.DNS:
            return any(_dns_match(self.pattern, name) for name in peer.dns_names)
        return any(_uri_match(self.pattern, uri) for uri in peer.uris)


def _dns_match(pattern: str, name: str) -> bool:
    pattern, name = pattern.lower().rstrip("."), name.lower().rstrip(".")
    if not pattern.startswith("*."):
        return pattern == name
    head, _, tail = name.partition(".")
    return bool(head) and "*" not in head and tail == pattern[2:]


def _uri_match(pattern: str, uri: str) -> bool:
    want, have = pattern.split("/"), uri.split("/")
    if want[-1] == "**":
        tail = have[len(want) - 1 :]
        if not tail or "" in tail:
            return False
        have = [*have[: len(want) - 1], "**"]
    if len(want) != len(have):
        return False
    return all(w == h or (w == "*" and h != "") for w, h in zip(want, have, strict=True))


@dataclass(frozen=True, slots=True)
class AllowList:
    """Peers admitted after chain validation. Empty means nobody, unless ``any_peer``."""

    rules: tuple[AllowRule, ...] = ()
    any_peer: bool = False

    @classmethod
    def of(cls, rules: Iterable[str]) -> AllowList:
        """Build from ``kind:pattern`` strings."""
        return cls(tuple(AllowRule.parse(r) for r in rules))

    def permits(self, peer: PeerIdentity) -> bool:
        """True if some rule admits the peer (or every validated peer is allowed)."""
        return self.any_peer or any(rule.matches(peer) for rule in self.rules)
