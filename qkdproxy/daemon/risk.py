"""Risky settings: what `check-config` and start-up warn about, and strict mode refuses.

Each setting here is valid (someone may need it) but weakens what qkdproxy promises, often
without the operator noticing. Private key files that group or others can read are worse
than risky: like OpenSSH, qkdproxy refuses them unless ``allow_readable_keys`` is set.
"""

from __future__ import annotations

import ipaddress
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from qkdproxy.core.policy import Policy
from qkdproxy.core.tls.certpolicy import CertificatePolicy, CertificatePolicyError, Role
from qkdproxy.daemon.config import Config, TunnelConfig, tunnel_where

# A handshake allowed this long, with no idle timeout, lets slow clients hold slots.
LONG_HANDSHAKE_S = 60.0


@dataclass(frozen=True, slots=True)
class Risk:
    """One risky setting: where it is, a stable code, and why it matters."""

    where: str
    code: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message} [{self.code}]"


@dataclass(frozen=True, slots=True)
class Assessment:
    """Problems that refuse the configuration, and warnings (refused too in strict mode)."""

    errors: list[str]
    warnings: list[Risk]

    def refusals(self, strict: bool) -> list[str]:
        """Everything that stops the configuration from being used."""
        if not strict:
            return list(self.errors)
        return [*self.errors, *(f"{w} (refused in strict mode)" for w in self.warnings)]


def assess(config: Config) -> Assessment:
    """The risky settings of ``config`` and the state of its private key files."""
    warnings = risky_settings(config)
    errors: list[str] = []
    for where, path in _key_files(config):
        exposed = _exposed(path)
        if exposed is None:
            continue
        text = f"private key {path} is {exposed} (chmod 600"
        if config.daemon.allow_readable_keys:
            warnings.append(Risk(where, "readable_key", text + "; allowed by allow_readable_keys)"))
        else:
            errors.append(f"{where}: {text}, or set [daemon] allow_readable_keys = true)")
    warnings += _own_certificates(config)
    return Assessment(errors, warnings)


def _own_certificates(config: Config) -> list[Risk]:
    """Our own certificates against the policy our peers apply by default: one that fails
    it will be refused by an up-to-date peer (or KME)."""
    ours: list[tuple[str, Path, Role]] = [
        (f"kme.{name}.cert", kme.cert, "client") for name, kme in config.kmes.items()
    ]
    ours += [(f"{tunnel_where(t.name)}.cert", t.cert, "server" if t.role == "server" else
              "client") for t in config.tunnels]  # fmt: skip
    risks = []
    for where, path, role in ours:
        try:
            chain = x509.load_pem_x509_certificates(path.read_bytes())
            CertificatePolicy().check(chain, role)
        except CertificatePolicyError as exc:
            risks.append(Risk(where, "weak_own_certificate", f"{path}: {exc}"))
        except (OSError, ValueError):
            continue  # unreadable: loading it reports that
    return risks


def risky_settings(config: Config) -> list[Risk]:
    """The risky settings of a parsed configuration (pure: no file is read)."""
    risks: list[Risk] = []
    status = config.daemon.status_listen
    if status is not None and not status.loopback:
        message = f"the status listener {status} is reachable beyond this host"
        risks.append(Risk("status", "public_status", message))
    for tunnel in config.tunnels:
        risks += _tunnel_risks(tunnel_where(tunnel.name), tunnel)
    return risks


def _tunnel_risks(where: str, t: TunnelConfig) -> list[Risk]:
    risks = []

    def add(code: str, message: str) -> None:
        risks.append(Risk(where, code, message))

    if t.role == "server" and t.allow_any_peer:
        add(
            "allow_any_peer",
            "allow_any_peer admits every certificate the CA bundle ever "
            "issued (KMEs and SAEs included), not only your client tunnels",
        )
    if t.role == "client" and not t.allow and _is_ip(t.server_name):
        add(
            "ip_server_name_without_allow",
            f"server_name {t.server_name} is an IP address and there is no allow rule: any "
            "certificate of the CA carrying that IP (a KME's, with the development CA) is "
            "accepted as the peer; add an allow rule naming the server tunnel",
        )
    if t.handshake_timeout_s > LONG_HANDSHAKE_S and t.idle_timeout_s == 0:
        add(
            "slow_timeouts",
            f"handshake_timeout_s = {t.handshake_timeout_s:g} with idle_timeout_s = 0: slow "
            "or silent peers can hold connection slots for a long time",
        )
    if t.role == "server" and t.policy is Policy.QKD_PREFERRED:
        add(
            "qkd_preferred_server",
            "a qkd-preferred server accepts the non-QKD groups "
            f"({'/'.join(g.name for g in t.plan.fallback)}) from any allowed client; such "
            'connections are logged with "fallback": true. Use qkd-pq-required to insist',
        )
    if t.accept_unechoed_key_id:
        add(
            "accept_unechoed_key_id",
            "accept_unechoed_key_id: the server's key id is not checked (for paper-era "
            "reference 0.1.x servers only); a key mismatch then shows as a failed handshake "
            "instead of a clear refusal",
        )
    if t.allow_public_plaintext:
        add(
            "public_plaintext",
            "the plaintext side is reachable beyond this host "
            "(allow_public_plaintext): traffic there is not protected",
        )
    if t.max_handshakes_per_source == 0 and t.first_byte_timeout_s == 0:
        add(
            "admission_off",
            "per-source handshake cap and first-byte deadline are both off: "
            "one source can hold every connection slot",
        )
    return risks


def _is_ip(name: str | None) -> bool:
    try:
        ipaddress.ip_address(name or "")
    except ValueError:
        return False
    return True


def _key_files(config: Config) -> list[tuple[str, Path]]:
    files = [(f"kme.{name}.key", kme.key) for name, kme in config.kmes.items()]
    files += [(f"{tunnel_where(t.name)}.key", t.key) for t in config.tunnels]
    return files


def _exposed(path: Path) -> str | None:
    """How a key file is exposed to other users, or None (also when it cannot be read:
    loading it reports that)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    who = [name for bits, name in ((0o070, "group"), (0o007, "others")) if mode & bits]
    if not who:
        return None
    return f"accessible by {' and '.join(who)} (mode {stat.S_IMODE(mode):04o})"
