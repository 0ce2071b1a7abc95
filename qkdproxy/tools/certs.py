"""``qkdproxy certs``: write the whole development PKI to a directory.

One CA (written as ``ca.pem`` and, for the KME side, ``kme-ca.pem``); a server certificate
per KME (DNS ``localhost`` and its name, IP 127.0.0.1); an
SAE client certificate per side (CN = SAE id, URI SAN ``spiffe://qkdproxy.test/sae/<id>``);
tunnel certificates for the client and server daemons.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from qkdproxy.core.tls.credentials import Credentials
from qkdproxy.sim.pki import CertificateAuthority

TRUST_DOMAIN = "qkdproxy.test"
KMES = ("kme-a", "kme-b")
SAES = ("sae-a", "sae-b")
TUNNEL_SERVER_NAME = f"server.{TRUST_DOMAIN}"


@dataclass(frozen=True, slots=True)
class DevPki:
    """The credentials of the development set-up, in memory."""

    ca: CertificateAuthority
    kmes: dict[str, Credentials]
    saes: dict[str, Credentials]
    tunnel_server: Credentials
    tunnel_client: Credentials

    @classmethod
    def create(cls) -> DevPki:
        """A fresh PKI."""
        ca = CertificateAuthority.create()
        return cls(
            ca,
            {k: ca.issue(k, ["localhost", k, "127.0.0.1", "::1"], client=False) for k in KMES},
            {s: ca.issue(s, [f"spiffe://{TRUST_DOMAIN}/sae/{s}"], server=False) for s in SAES},
            ca.issue(
                "tunnel-server",
                [
                    TUNNEL_SERVER_NAME,
                    "localhost",
                    "127.0.0.1",
                    f"spiffe://{TRUST_DOMAIN}/tunnel/server",
                ],
            ),
            ca.issue("tunnel-client", [f"spiffe://{TRUST_DOMAIN}/tunnel/client"], server=False),
        )

    def files(self) -> dict[str, bytes]:
        """File name -> PEM contents."""
        # kme-ca.pem: the CA that signed the KMEs, a file of its own so that deployments keep
        # the KME's CA (a vendor's, in production) apart from the tunnel peers' CA.
        out = {
            "ca.pem": _cert_pem(self.ca.certificate),
            "kme-ca.pem": _cert_pem(self.ca.certificate),
        }
        named = {**self.kmes, **self.saes, "tunnel-server": self.tunnel_server,
                 "tunnel-client": self.tunnel_client}  # fmt: skip
        for name, credentials in named.items():
            out[f"{name}.pem"] = b"".join(_cert_pem(c) for c in credentials.chain)
            out[f"{name}-key.pem"] = _key_pem(credentials)
        return out

    def write(self, directory: Path, force: bool = False) -> list[Path]:
        """Write :meth:`files` (keys mode 0600: the daemon refuses keys others can read);
        refuse to overwrite existing files unless ``force``."""
        files = self.files()
        directory.mkdir(parents=True, exist_ok=True)
        existing = [directory / name for name in files if (directory / name).exists()]
        if existing and not force:
            raise FileExistsError(f"{existing[0]} exists (use --force to replace the PKI)")
        written = []
        for name, data in files.items():
            path = directory / name
            private = name.endswith("-key.pem")
            mode = 0o600 if private else 0o644
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            os.fchmod(fd, mode)  # an existing file keeps its old mode otherwise
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            written.append(path)
        return written


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(credentials: Credentials) -> bytes:
    return credentials.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )  # fmt: skip


def write_dev_pki(directory: Path, force: bool = False) -> list[Path]:
    """Write a fresh PKI; refuse to overwrite existing files unless ``force``."""
    return DevPki.create().write(directory, force)
