"""Two :class:`TlsConnection` ends joined in memory with a man in the middle: every
transmission of either direction passes a hook that may rewrite it (tamper, truncate, end
it with EOF). Used by the native engine's attack tests."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from qkdproxy.core.hybrid import HybridKem
from qkdproxy.core.keys import KeyNotFoundError, QkdKey
from qkdproxy.core.tls.connection import (
    ConnectionConfig,
    Event,
    HandshakeComplete,
    KeyNeeded,
    Outcome,
    Phase,
    TlsConnection,
)
from qkdproxy.core.tls.credentials import Credentials
from qkdproxy.core.tls.engine import EngineSpec
from qkdproxy.core.tls.events import DataReceived, Failed
from qkdproxy.core.tls.identity import AllowList
from qkdproxy.core.tls.keyexchange import (
    CloseStream,
    FetchKey,
    KeyAnswer,
    KeyFailure,
    KeyRequest,
    OpenStream,
    QkdOptions,
    StreamKey,
    TakeKey,
)
from qkdproxy.core.tls.native import NativeEngineSpec
from qkdproxy.core.tls.tlslite_glue import TlsliteEngineSpec, install
from qkdproxy.core.tls.verify import PeerPolicy
from qkdproxy.keys.context import KeyContext
from qkdproxy.keys.sources import KeySources
from qkdproxy.sim.pki import CertificateAuthority
from qkdproxy.tools.loopback import CLIENT_URI, SERVER_NAME

TIMEOUT = 10.0
# 16 hex digits in a row, or a bytes repr: what key material looks like in text.
BYTES_IN_TEXT = re.compile(r"[0-9a-fA-F]{16}|\\x[0-9a-f]{2}|b'|b\"")
CLIENT, SERVER = "client", "server"
# hook(direction, index of this transmission in that direction, bytes) -> bytes to deliver,
# or None to deliver them and then end that direction (EOF).
Hook = Callable[[str, int, bytes], "bytes | Cut"]


@dataclass(frozen=True)
class Cut:
    """Deliver ``data`` then end the direction with EOF."""

    data: bytes


@dataclass
class Kme:
    """Both ends' KME in a dict: every request answered at once."""

    keys: dict[bytes, QkdKey] = field(default_factory=dict)
    streams: dict[bytes, bytes] = field(default_factory=dict)

    def answer(self, request: KeyRequest) -> KeyAnswer:
        if isinstance(request, TakeKey):
            key = QkdKey(os.urandom(16), os.urandom(32))
            self.keys[key.key_id] = key
            return key
        if isinstance(request, FetchKey):
            found = self.keys.get(request.key_id)
            return found if found else KeyFailure(KeyNotFoundError("unknown key"))
        if isinstance(request, OpenStream):
            ksid = request.ksid or os.urandom(16)
            self.streams.setdefault(ksid, os.urandom(32))
            return ksid
        if isinstance(request, StreamKey):
            return self.streams[request.ksid]
        return None


class _Present:
    """A configured key source (never called: the harness answers)."""


@dataclass(frozen=True)
class Identities:
    """One CA and the two leaves it issued (issuing is the slow part: once per module)."""

    ca: CertificateAuthority
    client: Credentials
    server: Credentials

    @classmethod
    def create(cls, key_type: str = "ecdsa-p256") -> Identities:
        ca = CertificateAuthority.create()
        return cls(
            ca,
            ca.issue("client", [CLIENT_URI], server=False, key_type=key_type),  # type: ignore[arg-type]
            ca.issue("server", [SERVER_NAME], client=False, key_type=key_type),  # type: ignore[arg-type]
        )


def spec(engine: str, credentials: Credentials) -> EngineSpec:
    """The named engine prepared for ``credentials``."""
    return (
        NativeEngineSpec.of(credentials)
        if engine == "native"
        else TlsliteEngineSpec.of(credentials)
    )


def config(
    ids: Identities,
    hybrids: list[HybridKem],
    *,
    client: bool,
    engine: EngineSpec,
    alpn: list[bytes] | None = None,
    eku: bool = False,
) -> ConnectionConfig:
    install(g.group for g in hybrids)
    if client:
        policy = PeerPolicy(
            (ids.ca.certificate,), AllowList.of([f"dns:{SERVER_NAME}"]), SERVER_NAME
        )
    else:
        policy = PeerPolicy((ids.ca.certificate,), AllowList.of([f"uri:{CLIENT_URI}"]))
    return ConnectionConfig(
        groups=hybrids,
        peer=policy,
        engine=engine,
        server_name=SERVER_NAME if client else None,
        alpn=alpn,
        handshake_timeout=TIMEOUT,
        fresh_key_update=eku,
    )


def keys() -> KeyContext:
    sources = KeySources(_Present(), _Present(), _Present())  # type: ignore[arg-type]
    return KeyContext(sources, QkdOptions())


@dataclass
class Link:
    """Client and server with the hook between them."""

    client: TlsConnection
    server: TlsConnection
    hook: Hook | None = None
    kme: Kme = field(default_factory=Kme)
    events: dict[str, list[Event]] = field(default_factory=lambda: {CLIENT: [], SERVER: []})
    sent: dict[str, list[bytes]] = field(default_factory=lambda: {CLIENT: [], SERVER: []})
    closed: set[str] = field(default_factory=set)
    now: float = 0.0

    def conn(self, name: str) -> TlsConnection:
        return self.client if name == CLIENT else self.server

    def start(self) -> Link:
        self.server.start(self.now)
        self.client.start(self.now)
        return self.run()

    def run(self, max_rounds: int = 60) -> Link:
        """Move bytes and answer key requests until nothing moves; a stall then times out
        (what the deadline would do)."""
        for _ in range(max_rounds):
            moved = False
            for name, peer_name in ((CLIENT, SERVER), (SERVER, CLIENT)):
                conn, peer = self.conn(name), self.conn(peer_name)
                for event in conn.next_events():
                    self.events[name].append(event)
                    if isinstance(event, KeyNeeded) and not isinstance(event.request, CloseStream):
                        conn.answer_key(self.kme.answer(event.request), self.now)
                        moved = True
                data = conn.data_to_send()
                if not data or name in self.closed:
                    continue
                moved = True
                index = len(self.sent[name])
                self.sent[name].append(data)
                out = self.hook(name, index, data) if self.hook else data
                eof = isinstance(out, Cut)
                payload = out.data if isinstance(out, Cut) else out
                self._deliver(peer_name, payload)
                if eof:
                    self.closed.add(name)
                    if peer.phase is not Phase.ESTABLISHED:
                        peer.receive_eof(self.now)
            if not moved:
                break
        else:
            raise AssertionError("the link never settled")
        for name in (CLIENT, SERVER):
            conn = self.conn(name)
            if conn.phase not in (Phase.ESTABLISHED, Phase.FAILED):
                conn.handle_timer(self.now + TIMEOUT)
                self.events[name] += conn.next_events()
        return self

    def _deliver(self, name: str, data: bytes) -> None:
        conn = self.conn(name)
        if not data:
            return
        if conn.phase is Phase.ESTABLISHED:
            assert conn.records is not None
            self.events[name] += conn.records.receive(data, self.now)
        else:
            conn.receive_data(data, self.now)
            # Bytes that came with the end of the handshake go to the record layer (as the
            # stream driver hands them over).
            if conn.records is not None and (leftover := conn.take_leftover()):
                self.events[name] += conn.records.receive(leftover, self.now)

    def complete(self, name: str) -> bool:
        return any(isinstance(e, HandshakeComplete) for e in self.events[name])

    def failed(self, name: str) -> Failed | None:
        return next((e for e in self.events[name] if isinstance(e, Failed)), None)

    def assert_no_internal_error(self) -> None:
        """Nobody blamed itself for what the peer sent, and no failure reason carries bytes
        (a share, a secret, a signature) in hex or repr form."""
        for name in (CLIENT, SERVER):
            error = self.conn(name).error
            assert error is None or error.outcome is not Outcome.INTERNAL, (name, error.reason)
            if error is not None:
                assert not BYTES_IN_TEXT.search(error.reason), error.reason

    def assert_same_keys(self) -> None:
        """Both ends read what the other wrote, both ways, after a key update."""
        client, server = self.client.records, self.server.records
        assert client is not None and server is not None
        client.send_data(b"ping")
        client.update_keys(request_peer=True)
        assert DataReceived(b"ping") in server.receive(self.client.data_to_send(), self.now)
        server.send_data(b"pong")
        assert DataReceived(b"pong") in client.receive(self.server.data_to_send(), self.now)


def link(
    ids: Identities,
    hybrids: list[HybridKem],
    server_hybrids: list[HybridKem] | None = None,
    *,
    client_engine: EngineSpec | str = "native",
    server_engine: EngineSpec | str = "native",
    hook: Hook | None = None,
    alpn: tuple[list[bytes] | None, list[bytes] | None] = (None, None),
    eku: bool = False,
    start: bool = True,
) -> Link:
    """A client and a server joined through ``hook``, started and run to the end."""
    wall = datetime.now(UTC)
    client_spec = (
        spec(client_engine, ids.client) if isinstance(client_engine, str) else client_engine
    )
    server_spec = (
        spec(server_engine, ids.server) if isinstance(server_engine, str) else server_engine
    )
    result = Link(
        TlsConnection(
            config(ids, hybrids, client=True, engine=client_spec, alpn=alpn[0], eku=eku),
            keys(),
            is_client=True,
            wall_time=wall,
        ),
        TlsConnection(
            config(
                ids,
                server_hybrids or hybrids,
                client=False,
                engine=server_spec,
                alpn=alpn[1],
                eku=eku,
            ),
            keys(),
            is_client=False,
            wall_time=wall,
        ),
        hook,
    )
    return result.start() if start else result
