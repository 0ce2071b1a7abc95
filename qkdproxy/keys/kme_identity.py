"""The identity a KME must prove with its certificate (ETSI GS QKD 014, section 5.1).

By default a KME's certificate must name the host of its URL or address (standard hostname
checking). Many vendor KMEs carry their KME ID in the subject CN and have no SAN at all; for
them ``[kme.NAME] kme_identity`` names what to expect instead (``cn:KME_B``, ``dns:...``,
``uri:...``, the allow-rule syntax). The chain is verified against the configured CA either
way; only the name check changes. The check runs right after the TLS handshake, before any
request is sent.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography import x509

from qkdproxy.core.tls.identity import AllowRule, PeerIdentity


@dataclass(frozen=True, slots=True)
class ExpectedKme:
    """Names the KME's certificate may carry; any one of them is enough."""

    rules: tuple[AllowRule, ...]

    @classmethod
    def parse(cls, texts: Iterable[str]) -> ExpectedKme:
        """``kind:pattern`` strings; ValueError if one is malformed or none is given."""
        rules = tuple(AllowRule.parse(t) for t in texts)
        if not rules:
            raise ValueError("name at least one identity (cn:NAME, dns:NAME or uri:URI)")
        return cls(rules)

    def describe(self) -> str:
        """The rules as configured, for messages."""
        return " or ".join(f"{r.kind.value}:{r.pattern}" for r in self.rules)

    def prepare(self, context: ssl.SSLContext) -> ssl.SSLContext:
        """Turn off the URL host check in ``context`` (this match replaces it); the chain is
        still verified against the configured CA."""
        context.check_hostname = False
        context.verify_mode = ssl.CERT_REQUIRED
        return context

    def mismatch(self, ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str | None:
        """None if the verified peer certificate matches, else why not (log-safe)."""
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der:
            return "the KME presented no certificate"
        peer = PeerIdentity.from_certificate(x509.load_der_x509_certificate(der))
        if any(rule.matches(peer) for rule in self.rules):
            return None
        return (
            f"KME identity mismatch: expected {self.describe()}, the certificate has "
            f"CN={peer.common_name!r}, DNS={list(peer.dns_names)}, URI={list(peer.uris)}"
        )
