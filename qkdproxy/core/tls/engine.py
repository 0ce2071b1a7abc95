"""What :class:`~qkdproxy.core.tls.connection.TlsConnection` needs of a TLS 1.3 handshake
engine, and the three ways an engine says a handshake ended badly.

Two engines implement it: :mod:`qkdproxy.core.tls.native` (ours, the default) and
:mod:`qkdproxy.core.tls.tlslite_glue` (tlslite-ng). Both are sans-I/O: bytes in, bytes out;
the connection keeps the hello gate, the key exchange and the deadline, and calls the engine
only with bytes the gate released.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from qkdproxy.core.groups import GroupSpec
from qkdproxy.core.tls.eku import KeySchedule
from qkdproxy.core.tls.hello import ParsedClientHello, ParsedServerHello
from qkdproxy.core.tls.record_layer import KeyUpdatePolicy, RecordLayer
from qkdproxy.core.tls.wire import HeldHello

ENGINES = ("native", "tlslite")
DEFAULT_ENGINE = "native"


class LocalAlertError(Exception):
    """We ended the handshake with a fatal alert (already queued for the peer)."""

    def __init__(self, description: int, message: str) -> None:
        super().__init__(message)
        self.description = description
        self.message = message


class RemoteAlertError(Exception):
    """The peer sent a fatal alert (or close_notify) during the handshake."""

    def __init__(self, description: int, message: str) -> None:
        super().__init__(message)
        self.description = description


class AbruptCloseError(Exception):
    """The peer closed the connection before the handshake completed."""


class HandOverError(Exception):
    """The engine holds something the record layer could not take over."""


class KeyExchangeHooks(Protocol):
    """The per-connection key exchange an engine calls (prepared by :mod:`keyexchange`)."""

    def key_share(self, group: int) -> tuple[bytes, object]: ...

    def shared_secret(self, group: int, peer_share: bytes) -> bytes: ...


class PeerChainCheck(Protocol):
    """A client's check of the server's chain: None if accepted, else (alert, reason)."""

    def __call__(self, chain: list[bytes]) -> tuple[int, str] | None: ...


class HandshakeEngine(Protocol):
    """One handshake of one role, driven by :class:`TlsConnection`."""

    eku_offer: bool

    def start_client(self, groups: Sequence[GroupSpec], share_group: GroupSpec) -> None:
        """Queue the ClientHello offering ``groups`` with one key share, for ``share_group``."""

    def start_server(self, groups: Sequence[GroupSpec]) -> None:
        """Get ready for the ClientHello; ``groups`` are the ones the server may choose."""

    def feed(self, data: bytes) -> None:
        """Bytes from the peer (released by the hello gate)."""

    def feed_client_hello(self, hello: HeldHello, parsed: ParsedClientHello) -> None:
        """A server's held ClientHello, released with the connection's parse of it: an
        engine that checks the message itself may take ``parsed`` rather than parse again."""

    def feed_server_hello(self, hello: HeldHello, parsed: ParsedServerHello) -> None:
        """A client's held ServerHello (or HelloRetryRequest) with the connection's parse
        of it, likewise."""

    def feed_eof(self) -> None:
        """The peer closed its sending side."""

    def step(self) -> bool:
        """Run on what was fed; True once the handshake is complete. Raises
        :class:`LocalAlertError`, :class:`RemoteAlertError` or :class:`AbruptCloseError`."""

    def take_output(self) -> bytes:
        """Bytes for the peer, in order."""

    def send_alert(self, alert: int, reason: str) -> None:
        """Queue a fatal alert (protected if keys are set) and raise :class:`LocalAlertError`."""

    def hand_over(self, policy: KeyUpdatePolicy | None = None) -> tuple[RecordLayer, bytes]:
        """The established connection's record layer and the bytes read past the handshake."""

    def key_schedule(self) -> KeySchedule:
        """Where the first Extended Key Update chains from (after completion)."""

    @property
    def peer_chain(self) -> list[bytes]:
        """The certificates the peer sent (DER, leaf first; empty if none)."""

    @property
    def cipher_name(self) -> str:
        """The negotiated suite, by the names metrics and logs use ("aes256gcm")."""

    @property
    def alpn(self) -> bytes | None:
        """The negotiated application protocol, if any."""

    @property
    def eku_negotiated(self) -> bool:
        """Both sides offered Extended Key Update."""


class EngineSpec(Protocol):
    """One engine prepared for one endpoint (its credentials in the engine's own form)."""

    @property
    def name(self) -> str:
        """ "native" or "tlslite"."""

    def new(
        self,
        hooks: KeyExchangeHooks,
        *,
        is_client: bool,
        chain_check: PeerChainCheck | None,
        alpn: Sequence[bytes] | None,
        server_name: str | None,
    ) -> HandshakeEngine:
        """A fresh engine for one handshake."""
