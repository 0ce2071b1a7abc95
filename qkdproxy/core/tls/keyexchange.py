"""Per-handshake key exchange: group choice, PQ arithmetic and the QKD key lifecycle.

No sockets, no KME calls and no TLS state machine here. The session driver hands in parsed
hellos while it holds the hello bytes back; each step is a generator (:class:`KeySteps`)
that yields the key-source calls it needs as data (:data:`KeyRequest`) and receives their
answers, so the driver (:mod:`qkdproxy.keys.key_supply`) does every KME call. tlslite later
asks these objects, through two synchronous hooks, for the key share and the shared secret
they prepared.

Every QKD key a handshake takes ends in the ledger as consumed (the handshake completed) or
wasted (anything else), and no key id is accepted twice by the same endpoint.
"""

from __future__ import annotations

import hmac
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Generic, Protocol, TypeVar

from qkdproxy.core.accounting import KeyIdGuard, KeyLedger
from qkdproxy.core.errors import ProtocolError
from qkdproxy.core.hybrid import (
    ZERO_KEY_ID,
    ClientPrivate,
    HybridKem,
    KeyPairReserve,
    attach_key_id,
    detach_key_id,
    key_ids_equal,
    with_qkd_key,
)
from qkdproxy.core.kem.base import KemError
from qkdproxy.core.keys import KeyNotFoundError, QkdKey, QkdKeyError, key_id_to_text
from qkdproxy.core.tls.hello import ClientHello, ServerHello
from qkdproxy.core.tls.wire import Alert

T = TypeVar("T")


class Flow(StrEnum):
    """Which side originates the QKD key id."""

    CLIENT_INITIATED = "client-initiated"
    SERVER_INITIATED = "server-initiated"


class KeyApi(StrEnum):
    """The KME interface the endpoint uses."""

    ETSI_014 = "014"
    ETSI_004 = "004"


@dataclass(frozen=True, slots=True)
class QkdOptions:
    """QKD behaviour of an endpoint. ``flow`` matters to clients only: servers serve both."""

    flow: Flow = Flow.CLIENT_INITIATED
    api: KeyApi = KeyApi.ETSI_014
    # Reference 0.1.x servers send zeros (or garbage) instead of echoing the key id.
    accept_unechoed_key_id: bool = False


class SpendGate(Protocol):
    """Hook (issue 12): consulted by a server before any KME call a ClientHello would cost;
    see qkdproxy.keys.preauth. Returns None to go ahead, else the reason to refuse."""

    def admit(self, flow: str) -> str | None: ...


class KeySourcesPresent(Protocol):
    """Which key sources an endpoint has (the key exchange never calls them)."""

    @property
    def master(self) -> object | None: ...

    @property
    def slave(self) -> object | None: ...

    @property
    def stream(self) -> object | None: ...


class ExchangeContext(Protocol):
    """What all handshakes of one endpoint share, as the key exchange sees it: options,
    accounting, replay guard, spend gate and which key sources exist. The calls are made
    by :mod:`qkdproxy.keys.key_supply` from a :class:`qkdproxy.keys.context.ExchangeContext`."""

    @property
    def sources(self) -> KeySourcesPresent: ...

    @property
    def options(self) -> QkdOptions: ...

    @property
    def ledger(self) -> KeyLedger: ...

    @property
    def guard(self) -> KeyIdGuard: ...

    @property
    def gate(self) -> SpendGate | None: ...


class HandshakeRejectedError(ProtocolError):
    """The handshake must end with ``alert``; ``reason`` is safe to log (no key material)."""

    alert: Alert

    def __init__(self, alert: Alert, reason: str, key_source: bool = False) -> None:
        super().__init__(reason, alert)
        # True when the KME (not the peer) failed: a qkd-preferred tunnel may fall back.
        self.key_source = key_source


@dataclass(slots=True)
class HandshakeRecord:
    """What fed one handshake's secret: group, flow and QKD key id (never the key)."""

    group: str | None = None
    flow: Flow | None = None
    api: KeyApi | None = None
    qkd_key_id: str | None = None
    hello_retry: bool = False
    # The key id (or ETSI 004 KSID) this side took from its own source and sent, if any.
    offered_key_id: str | None = None


@dataclass(frozen=True, slots=True)
class TakeKey:
    """ETSI 014 enc_keys: a fresh key from the master source."""


@dataclass(frozen=True, slots=True)
class FetchKey:
    """ETSI 014 dec_keys: the key the peer named, from the slave source."""

    key_id: bytes


@dataclass(frozen=True, slots=True)
class OpenStream:
    """ETSI 004 OPEN_CONNECT (``ksid`` None: the KME picks one); answered with the KSID."""

    ksid: bytes | None


@dataclass(frozen=True, slots=True)
class StreamKey:
    """ETSI 004 GET_KEY; answered with the key bytes."""

    ksid: bytes
    index: int = 0


@dataclass(frozen=True, slots=True)
class CloseStream:
    """ETSI 004 CLOSE, off the handshake's path: answered at once with None."""

    ksid: bytes


KeyRequest = TakeKey | FetchKey | OpenStream | StreamKey | CloseStream


@dataclass(frozen=True, slots=True)
class KeyFailure:
    """The answer to a request whose key-source call raised ``error``."""

    error: BaseException


KeyAnswer = QkdKey | bytes | None | KeyFailure
Steps = Generator[KeyRequest, KeyAnswer, T]


@dataclass(frozen=True, slots=True)
class KeySteps(Generic[T]):
    """One step of a key exchange: run ``steps`` answering its requests from ``context``."""

    steps: Steps[T]
    context: ExchangeContext


@dataclass(slots=True)
class _HeldKey:
    """A QKD key (or an ETSI 004 stream that will yield one) owned by one handshake."""

    key_id: bytes
    material: bytes | None = field(default=None, repr=False)
    open_stream: bool = False
    # The id as ETSI 014 text, once formatted (the record names it up to twice).
    text: str | None = field(default=None, repr=False)

    def key_id_text(self) -> str:
        """The key id as ETSI 014 writes it, formatted once."""
        if self.text is None:
            self.text = key_id_to_text(self.key_id)
        return self.text


def key_material(held: _HeldKey) -> bytes:
    """The key bytes of a held key that has been fetched."""
    if held.material is None:
        raise HandshakeRejectedError(Alert.INTERNAL_ERROR, "QKD key not fetched")
    return held.material


def _request(request: KeyRequest, what: str) -> Steps[KeyAnswer]:
    """Ask the driver for a key-source call; turn every failure into a rejection with a
    safe reason."""
    answer = yield request
    if not isinstance(answer, KeyFailure):
        return answer
    exc = answer.error
    if isinstance(exc, KeyNotFoundError):
        raise HandshakeRejectedError(Alert.ILLEGAL_PARAMETER, f"{what}: {exc}")
    if isinstance(exc, QkdKeyError):
        raise HandshakeRejectedError(Alert.INTERNAL_ERROR, f"{what}: {exc}", True)
    # A key source bug must fail the handshake, not the daemon.
    raise HandshakeRejectedError(
        Alert.INTERNAL_ERROR, f"{what}: key source failed ({type(exc).__name__})", True
    )


def _key(answer: KeyAnswer) -> QkdKey:
    if not isinstance(answer, QkdKey):
        raise TypeError(f"expected a QkdKey, got {type(answer).__name__}")
    return answer


def _bytes(answer: KeyAnswer) -> bytes:
    if not isinstance(answer, bytes):
        raise TypeError(f"expected bytes, got {type(answer).__name__}")
    return answer


def _need(configured: object | None, what: str) -> None:
    if configured is None:
        raise HandshakeRejectedError(
            Alert.HANDSHAKE_FAILURE, f"no {what} key source configured", key_source=True
        )


class _KeyExchangeBase:
    """Key bookkeeping shared by both roles."""

    def __init__(self, context: ExchangeContext) -> None:
        self._ctx = context
        self._held: list[_HeldKey] = []
        self._used: _HeldKey | None = None
        self._secret: tuple[int, bytes, bytes] | None = None
        self._finished = False
        self.record = HandshakeRecord()

    def shared_secret(self, group: int, peer_share: bytes) -> bytes:
        """Hook for tlslite: the secret prepared for exactly this group and peer share."""
        if self._secret is None or self._secret[0] != group:
            raise LookupError("no shared secret prepared for this group")
        if not hmac.compare_digest(self._secret[1], bytes(peer_share)):
            raise LookupError("peer key share differs from the one processed")
        return self._secret[2]

    def _hold(self, held: _HeldKey) -> _HeldKey:
        self._held.append(held)
        if held.material is not None:
            self._ctx.ledger.record_taken()
        return held

    def _fetched(self, held: _HeldKey, material: bytes) -> bytes:
        """Record key bytes that arrived for a held ETSI 004 stream."""
        held.material = material
        self._ctx.ledger.record_taken()
        return material

    def _claim(self, key_id: bytes) -> None:
        if not self._ctx.guard.claim(key_id):
            raise HandshakeRejectedError(Alert.ILLEGAL_PARAMETER, "QKD key id was already used")

    def _use(self, held: _HeldKey, flow: Flow) -> None:
        self._used = held
        self.record.flow = flow
        self.record.api = self._ctx.options.api
        self.record.qkd_key_id = held.key_id_text()

    def _drop(self, reason: str, keep: _HeldKey | None = None) -> Steps[None]:
        for held in [h for h in self._held if h is not keep]:
            self._held.remove(held)
            if held.material is not None:
                self._ctx.ledger.record_wasted(reason)
            held.material = None
            yield from self._close_stream(held)

    def _close_stream(self, held: _HeldKey) -> Steps[None]:
        if held.open_stream and self._ctx.sources.stream is not None:
            held.open_stream = False
            # Off the handshake's path, bounded, best effort: the KME reclaims an abandoned
            # stream when its TTL ends.
            yield CloseStream(held.key_id)

    def finish(self, success: bool, reason: str = "handshake_failed") -> KeySteps[None]:
        """Settle every held key: consumed if it fed a completed handshake (or key update),
        else wasted with ``reason``."""
        return KeySteps(self._finish(success, reason), self._ctx)

    def _finish(self, success: bool, reason: str = "handshake_failed") -> Steps[None]:
        if self._finished:
            return
        self._finished = True
        used = self._used if success else None
        if used is not None and used.material is not None:
            self._ctx.ledger.record_consumed()
        yield from self._drop(reason, keep=used)
        if used is not None:
            used.material = None
            yield from self._close_stream(used)
        self._secret = None

    def _take_key(self) -> Steps[QkdKey]:
        _need(self._ctx.sources.master, "master (ETSI 014 enc_keys)")
        return _key((yield from _request(TakeKey(), "ETSI 014 enc_keys")))

    def _fetch_key(self, key_id: bytes) -> Steps[QkdKey]:
        _need(self._ctx.sources.slave, "slave (ETSI 014 dec_keys)")
        return _key((yield from _request(FetchKey(key_id), "ETSI 014 dec_keys")))

    def _open_stream(self, ksid: bytes | None) -> Steps[bytes]:
        _need(self._ctx.sources.stream, "ETSI 004 stream")
        return _bytes((yield from _request(OpenStream(ksid), "ETSI 004 OPEN_CONNECT")))

    def _stream_key(self, ksid: bytes) -> Steps[bytes]:
        _need(self._ctx.sources.stream, "ETSI 004 stream")
        return _bytes((yield from _request(StreamKey(ksid), "ETSI 004 GET_KEY")))


def _group(groups: Sequence[HybridKem], code_point: int) -> HybridKem | None:
    """The group of ``groups`` with ``code_point``, if any."""
    for hybrid in groups:
        if hybrid.group.code_point == code_point:
            return hybrid
    return None


@dataclass(slots=True)
class _Offer:
    hybrid: HybridKem
    private: ClientPrivate
    share: bytes
    held: _HeldKey | None


class ClientKeyExchange(_KeyExchangeBase):
    """The client's side: offers one key share, answers HelloRetryRequest, decapsulates."""

    def __init__(
        self,
        groups: Sequence[HybridKem],
        context: ExchangeContext,
        spares: KeyPairReserve | None = None,
    ) -> None:
        super().__init__(context)
        # Searched, not indexed: a connection offers one group or two of a short list, and
        # a dict of them cost more to build per connection than the searches.
        self._groups = groups
        self._offers: dict[int, _Offer] = {}
        self._spares = spares

    def offer(self, group: int, now: float | None = None) -> KeySteps[None]:
        """Prepare the key share for ``group``; QKD groups originate their key id first.
        With ``now``, the key pair may be a spare of the endpoint's reserve."""
        return KeySteps(self._offer(group, now), self._ctx)

    def _offer(self, group: int, now: float | None = None) -> Steps[None]:
        hybrid = _group(self._groups, group)
        if hybrid is None:
            raise KeyError(group)
        held: _HeldKey | None = None
        if self._spares is not None and now is not None:
            private, share = self._spares.take(hybrid, now)
        else:
            private, share = hybrid.generate()
        if hybrid.group.qkd:
            held = yield from self._originate()
            share = attach_key_id(share, held.key_id if held else ZERO_KEY_ID)
        self._offers[group] = _Offer(hybrid, private, share, held)

    def _originate(self) -> Steps[_HeldKey | None]:
        options = self._ctx.options
        if options.flow is Flow.SERVER_INITIATED:
            return None
        if options.api is KeyApi.ETSI_004:
            ksid = yield from self._open_stream(None)
            held = self._hold(_HeldKey(ksid, open_stream=True))
        else:
            key = yield from self._take_key()
            held = self._hold(_HeldKey(key.key_id, key.material))
        self.record.offered_key_id = held.key_id_text()
        return held

    def key_share(self, group: int) -> tuple[bytes, object]:
        """Hook for tlslite: the prepared share and private handle for ``group``."""
        offer = self._offers[group]
        return offer.share, offer.private

    def on_server_hello(self, hello: ServerHello) -> KeySteps[None]:
        """Process ServerHello (derive the secret) or HelloRetryRequest (offer again)."""
        return KeySteps(self._on_server_hello(hello), self._ctx)

    def _on_server_hello(self, hello: ServerHello) -> Steps[None]:
        if hello.group is None:
            raise HandshakeRejectedError(Alert.ILLEGAL_PARAMETER, "server sent no key share")
        if hello.hello_retry:
            yield from self._retry(hello.group)
            return
        offer = self._offers.get(hello.group)
        if offer is None or hello.key_exchange is None:
            raise HandshakeRejectedError(
                Alert.ILLEGAL_PARAMETER, "server chose a group not offered"
            )
        hybrid = offer.hybrid
        self.record.group = hybrid.group.name
        share = hello.key_exchange
        try:
            ciphertext, key_id = (
                detach_key_id(share, hybrid.ciphertext_size) if hybrid.group.qkd else (share, b"")
            )
            secret = hybrid.decapsulate(offer.private, ciphertext)
        except KemError as exc:
            raise HandshakeRejectedError(Alert.ILLEGAL_PARAMETER, str(exc)) from None
        if hybrid.group.qkd:
            secret = with_qkd_key(secret, (yield from self._qkd_key(offer, key_id)))
        self._secret = (hello.group, share, secret)

    def _retry(self, group: int) -> Steps[None]:
        # At most one retry per handshake is the connection's rule (TlsConnection.
        # _hello_retry), checked before this step can cost another key.
        if _group(self._groups, group) is None or group in self._offers:
            raise HandshakeRejectedError(
                Alert.ILLEGAL_PARAMETER, "HelloRetryRequest for a bad group"
            )
        self.record.hello_retry = True
        yield from self._drop("hello_retry")
        self._offers.clear()
        yield from self._offer(group)

    def _qkd_key(self, offer: _Offer, key_id: bytes) -> Steps[bytes]:
        if offer.held is None:
            return (yield from self._server_initiated_key(key_id))
        held = offer.held
        if not key_ids_equal(key_id, held.key_id) and not self._ctx.options.accept_unechoed_key_id:
            raise HandshakeRejectedError(
                Alert.ILLEGAL_PARAMETER, "server did not echo the QKD key id"
            )
        if held.material is None:
            self._fetched(held, (yield from self._stream_key(held.key_id)))
        self._use(held, Flow.CLIENT_INITIATED)
        return key_material(held)

    def _server_initiated_key(self, key_id: bytes) -> Steps[bytes]:
        if key_ids_equal(key_id, ZERO_KEY_ID):
            raise HandshakeRejectedError(Alert.ILLEGAL_PARAMETER, "server sent no QKD key id")
        self._claim(key_id)
        key = yield from self._fetch_key(key_id)
        held = self._hold(_HeldKey(key.key_id, key.material))
        self._use(held, Flow.SERVER_INITIATED)
        return key.material


class ServerKeyExchange(_KeyExchangeBase):
    """The server's side: chooses the group, fetches or originates the QKD key, encapsulates."""

    def __init__(self, groups: Sequence[HybridKem], context: ExchangeContext) -> None:
        super().__init__(context)
        self._preference = groups
        self._chosen: HybridKem | None = None
        self._share: bytes | None = None

    @property
    def chosen(self) -> HybridKem | None:
        """The group this handshake will use, once the first ClientHello was processed."""
        return self._chosen

    def key_share(self, group: int) -> tuple[bytes, object]:
        """Hook for tlslite: the server's prepared key share."""
        if self._share is None or self._secret is None or self._secret[0] != group:
            raise LookupError("no key share prepared for this group")
        return self._share, None

    def on_client_hello(self, hello: ClientHello) -> KeySteps[bool]:
        """Prepare the answer to a ClientHello; True if a HelloRetryRequest must follow."""
        return KeySteps(self._on_client_hello(hello), self._ctx)

    def _on_client_hello(self, hello: ClientHello) -> Steps[bool]:
        if self._chosen is None:
            self._chosen = self._choose(hello)
            if self._chosen is None:
                raise HandshakeRejectedError(
                    Alert.HANDSHAKE_FAILURE, "no key-exchange group in common"
                )
        elif self._chosen.group.code_point not in hello.supported_groups:
            raise HandshakeRejectedError(
                Alert.ILLEGAL_PARAMETER, "second ClientHello changed groups"
            )
        hybrid = self._chosen
        self.record.group = hybrid.group.name
        share = hello.share_for(hybrid.group.code_point)
        if share is None:
            # A retry is needed; whether one more is allowed is the connection's rule.
            self.record.hello_retry = True
            return True
        yield from self._answer(hybrid, share.key_exchange)
        return False

    def on_update_request(self, hybrid: HybridKem, client_share: bytes) -> KeySteps[None]:
        """Answer an Extended Key Update request in the connection's group exactly as a
        ClientHello share: PQ first, then the QKD key (claimed, fetched or originated)."""
        self._chosen = hybrid
        self.record.group = hybrid.group.name
        return KeySteps(self._answer(hybrid, client_share), self._ctx)

    def _choose(self, hello: ClientHello) -> HybridKem | None:
        """The server's most preferred group the client sent a share for, else the most
        preferred one it supports (then a HelloRetryRequest follows). Every group in the list
        is acceptable, so avoiding the extra round trip (and, in the client-initiated flow,
        the waste of the key the client already took) wins over strict preference order.
        """
        supported: HybridKem | None = None
        for hybrid in self._preference:
            code_point = hybrid.group.code_point
            if code_point in hello.supported_groups:
                if hello.share_for(code_point) is not None:
                    return hybrid
                if supported is None:
                    supported = hybrid
        return supported

    def _answer(self, hybrid: HybridKem, client_share: bytes) -> Steps[None]:
        # The PQ operation runs first: a malformed share costs no QKD key.
        try:
            public, key_id = (
                detach_key_id(client_share, hybrid.public_size)
                if hybrid.group.qkd
                else (client_share, b"")
            )
            ciphertext, secret = hybrid.encapsulate(public)
        except KemError as exc:
            raise HandshakeRejectedError(Alert.ILLEGAL_PARAMETER, str(exc)) from None
        if hybrid.group.qkd:
            material, key_id = yield from self._qkd_key(key_id)
            ciphertext = attach_key_id(ciphertext, key_id)
            secret = with_qkd_key(secret, material)
        self._share = ciphertext
        self._secret = (hybrid.group.code_point, client_share, secret)

    def _admit(self, flow: Flow) -> None:
        gate = self._ctx.gate
        if gate is not None and (refusal := gate.admit(flow.value)) is not None:
            raise HandshakeRejectedError(Alert.HANDSHAKE_FAILURE, refusal)

    def _qkd_key(self, client_key_id: bytes) -> Steps[tuple[bytes, bytes]]:
        server_initiated = key_ids_equal(client_key_id, ZERO_KEY_ID)
        self._admit(Flow.SERVER_INITIATED if server_initiated else Flow.CLIENT_INITIATED)
        if server_initiated:
            key = yield from self._take_key()
            held = self._hold(_HeldKey(key.key_id, key.material))
            self._use(held, Flow.SERVER_INITIATED)
            self.record.offered_key_id = self.record.qkd_key_id
            self.record.api = KeyApi.ETSI_014
            return key.material, key.key_id
        self._claim(client_key_id)
        if self._ctx.options.api is KeyApi.ETSI_004:
            ksid = yield from self._open_stream(client_key_id)
            held = self._hold(_HeldKey(ksid, open_stream=True))
            self._fetched(held, (yield from self._stream_key(ksid)))
        else:
            key = yield from self._fetch_key(client_key_id)
            held = self._hold(_HeldKey(key.key_id, key.material))
        self._use(held, Flow.CLIENT_INITIATED)
        return key_material(held), client_key_id
