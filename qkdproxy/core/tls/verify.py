"""Certificate chain validation for both TLS roles (tlslite-ng does none).

Pure: certificates, trust anchors and the current time come in; a verified identity or a
:class:`PeerRejectedError` carrying the TLS alert to send comes out.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from qkdproxy.core.tls.certpolicy import CertificatePolicy, CertificatePolicyError, Role
from qkdproxy.core.tls.identity import AllowList, PeerIdentity
from qkdproxy.core.tls.wire import Alert

MAX_CHAIN_DEPTH = 8


class PeerRejectedError(Exception):
    """The peer's certificate or identity is not acceptable."""

    def __init__(self, alert: Alert, reason: str, rule: str | None = None) -> None:
        super().__init__(reason)
        self.alert = alert
        self.reason = reason
        # The certificate-policy rule that failed, if that is why (tls/certpolicy.py).
        self.rule = rule


@dataclass(frozen=True, slots=True)
class PeerPolicy:
    """Who an endpoint accepts: trust anchors, allowed identities, expected server name."""

    trust_anchors: tuple[x509.Certificate, ...]
    allow: AllowList
    server_name: str | None = None
    certificates: CertificatePolicy = field(default_factory=CertificatePolicy)

    def verify_server(self, chain: Sequence[bytes], now: datetime) -> PeerIdentity:
        """Validate a server chain for ``server_name``, then the allow-list."""
        if not self.server_name:
            raise PeerRejectedError(Alert.INTERNAL_ERROR, "no server name configured to check")
        return self._allow(self._verified(chain, now, "server"))

    def verify_client(self, chain: Sequence[bytes], now: datetime) -> PeerIdentity:
        """Validate a client chain (clientAuth), then the allow-list."""
        return self._allow(self._verified(chain, now, "client"))

    def _verified(self, chain: Sequence[bytes], now: datetime, role: Role) -> PeerIdentity:
        """The identity in ``chain`` if it is valid at ``now`` for ``role`` (else raise).

        A peer presents the same chain on every connection, so a validation is remembered
        with the time span its verified path is valid in: the same chain, checked against
        the same anchors, policy, name and role at a time inside that span, would give the
        same answer. Refusals are never remembered, and the allow-list is applied each time.
        """
        frozen = _frozen(chain)
        key = (self.trust_anchors, self.certificates, self.server_name, role, frozen)
        known = _VALIDATED.get(key)
        if known is not None and known.not_before <= now <= known.not_after:
            return known.identity
        leaf, intermediates = _load(chain, now)
        self._check_policy(leaf, intermediates, role)
        if role == "server":
            assert self.server_name is not None
            try:
                verifier = self._builder(now).build_server_verifier(_subject(self.server_name))
            except ValueError:
                raise PeerRejectedError(
                    Alert.INTERNAL_ERROR, "configured server name is not a valid DNS name or IP"
                ) from None
            path = _run(lambda: verifier.verify(leaf, intermediates))
        else:
            client_verifier = self._builder(now).build_client_verifier()
            path = _run(lambda: client_verifier.verify(leaf, intermediates).chain)
        validated = _Validated(
            max(c.not_valid_before_utc for c in path),
            min(c.not_valid_after_utc for c in path),
            PeerIdentity.from_certificate(leaf),
        )
        if sum(map(len, frozen)) <= REMEMBERED_CHAIN_BYTES:
            if len(_VALIDATED) >= VALIDATED_MAX:
                _VALIDATED.clear()  # bounded: a peer cycling chains only costs itself work
            _VALIDATED[key] = validated
        return validated.identity

    def _check_policy(
        self, leaf: x509.Certificate, intermediates: list[x509.Certificate], role: Role
    ) -> None:
        try:
            self.certificates.check([leaf, *intermediates], role)
        except CertificatePolicyError as exc:
            raise PeerRejectedError(Alert.BAD_CERTIFICATE, str(exc), exc.rule) from None

    def _builder(self, now: datetime) -> PolicyBuilder:
        if not self.trust_anchors:
            raise PeerRejectedError(Alert.UNKNOWN_CA, "no trust anchors configured")
        return (
            PolicyBuilder()
            .store(Store(list(self.trust_anchors)))
            .time(now)
            .max_chain_depth(MAX_CHAIN_DEPTH)
        )

    def _allow(self, identity: PeerIdentity) -> PeerIdentity:
        if not self.allow.permits(identity):
            raise PeerRejectedError(Alert.ACCESS_DENIED, f"peer {identity.describe()} not allowed")
        return identity


@dataclass(frozen=True, slots=True)
class _Validated:
    """A chain that validated, the span its verified path is valid in, and its identity."""

    not_before: datetime
    not_after: datetime
    identity: PeerIdentity


VALIDATED_MAX = 256
# Only chains up to this size are remembered: a chain may carry extra certificates the
# path does not use (and a Certificate message may be 16 MB), so without it a client with
# any certificate from the CA, allowed or not, could pin VALIDATED_MAX huge chains.
REMEMBERED_CHAIN_BYTES = 64 * 1024
_VALIDATED: dict[tuple[object, ...], _Validated] = {}


def _subject(name: str) -> x509.DNSName | x509.IPAddress:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _load(chain: Sequence[bytes], now: datetime) -> tuple[x509.Certificate, list[x509.Certificate]]:
    if not chain:
        raise PeerRejectedError(Alert.CERTIFICATE_REQUIRED, "peer sent no certificate")
    if len(chain) > MAX_CHAIN_DEPTH + 1:
        raise PeerRejectedError(Alert.BAD_CERTIFICATE, "certificate chain too long")
    try:
        certs = [x509.load_der_x509_certificate(bytes(der)) for der in chain]
    except ValueError:
        raise PeerRejectedError(Alert.BAD_CERTIFICATE, "malformed certificate") from None
    leaf = certs[0]
    if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
        raise PeerRejectedError(Alert.CERTIFICATE_EXPIRED, "peer certificate outside its validity")
    return leaf, certs[1:]


def _run(verify: Callable[[], list[x509.Certificate]]) -> list[x509.Certificate]:
    try:
        return verify()
    except VerificationError as exc:
        message = str(exc)
        alert = Alert.UNKNOWN_CA if "candidates exhausted" in message else Alert.BAD_CERTIFICATE
        raise PeerRejectedError(alert, f"certificate rejected: {message}") from None


def _frozen(chain: Sequence[bytes]) -> tuple[bytes, ...]:
    return tuple(der if isinstance(der, bytes) else bytes(der) for der in chain)
