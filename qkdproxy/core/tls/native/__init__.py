"""qkdproxy's own TLS 1.3 handshake engine: sans-I/O, certificates both ways, no PSK.

Why it exists: tlslite-ng's pure-Python handshake was most of the CPU a tunnelled
connection costs (docs/PERFORMANCE.md). This engine does the same protocol with the
messages qkdproxy needs and nothing else, on `cryptography` and :mod:`hashlib`;
tlslite stays selectable (``tls_engine = "tlslite"``) and is the differential test peer.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from qkdproxy.core.tls.credentials import Credentials
from qkdproxy.core.tls.engine import HandshakeEngine, KeyExchangeHooks, PeerChainCheck
from qkdproxy.core.tls.native.client import NativeClient
from qkdproxy.core.tls.native.common import Identity
from qkdproxy.core.tls.native.server import NativeServer

__all__ = ["NativeClient", "NativeEngineSpec", "NativeServer"]


@dataclass(frozen=True, slots=True)
class NativeEngineSpec:
    """The native engine, prepared for one endpoint's credentials."""

    identity: Identity
    name: str = "native"

    @classmethod
    def of(cls, credentials: Credentials) -> NativeEngineSpec:
        """Encode the chain once per endpoint."""
        return cls(Identity.of(credentials))

    def new(
        self,
        hooks: KeyExchangeHooks,
        *,
        is_client: bool,
        chain_check: PeerChainCheck | None,
        alpn: Sequence[bytes] | None,
        server_name: str | None,
    ) -> HandshakeEngine:
        """A fresh client or server handshake."""
        role = NativeClient if is_client else NativeServer
        return role(
            hooks,
            self.identity,
            alpn=alpn,
            chain_check=chain_check,
            server_name=server_name,
            random=os.urandom,
        )
