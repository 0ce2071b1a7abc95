"""The Extended Key Update state machine of one connection (sans I/O).

:class:`FreshKeyUpdates` belongs to a :class:`~qkdproxy.core.tls.record_layer.RecordLayer` that
negotiated EKU. The record layer hands it every ExtendedKeyUpdate message; it answers with
messages to send, new traffic directions to install, and key-source requests
(:class:`~qkdproxy.core.tls.events.UpdateKeyNeeded`) that the driver answers exactly as in the
handshake. While a key request waits, the record layer opens no further inbound record:
after a key_update_response the peer may already send under keys not derived yet.

Rules (draft-ietf-tls-extended-key-update, TLS 1.3 steps):
- one update at a time; a request while one is in progress is unexpected_message;
- crossing requests: the one whose key share sorts lower is ignored (its key is wasted);
  equal shares are unexpected_message;
- a share in another group is illegal_parameter; malformed bodies decode_error;
- a peer requesting faster than the request budget is refused (unexpected_message);
- an update that fails (KME, peer key id, decapsulation) fails the connection closed; the
  keys it held are counted as wasted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from qkdproxy.core.accounting import KeyIdGuard, KeyLedger
from qkdproxy.core.errors import RemoteProtocolError
from qkdproxy.core.hybrid import HybridKem
from qkdproxy.core.keys import QkdKey
from qkdproxy.core.ratelimit import TokenBucket
from qkdproxy.core.tls.eku import (
    KEY_UPDATE_REQUEST,
    KEY_UPDATE_RESPONSE,
    NEW_KEY_UPDATE,
    EkuMessage,
    KeySchedule,
    encode,
)
from qkdproxy.core.tls.events import FreshKeysInstalled, RecordEvent, UpdateKeyNeeded
from qkdproxy.core.tls.hello import ServerHello
from qkdproxy.core.tls.keyexchange import (
    ClientKeyExchange,
    ExchangeContext,
    Flow,
    KeyAnswer,
    KeyApi,
    KeySourcesPresent,
    KeySteps,
    QkdOptions,
    ServerKeyExchange,
    SpendGate,
    Steps,
)
from qkdproxy.core.tls.wire import Alert


class State(Enum):
    """Where the update protocol is."""

    IDLE = "idle"
    AWAIT_RESPONSE = "await_response"  # initiator: request sent
    INITIATOR_KEYS = "initiator_keys"  # initiator: response in, its key step runs
    RESPONDER_KEYS = "responder_keys"  # responder: request in, its key step runs
    AWAIT_NKU = "await_new_key_update"  # responder: response sent, new write keys in use


@dataclass(frozen=True, slots=True)
class UpdatePolicy:
    """How many update requests a peer may make (``rate`` per second after ``burst``), and
    how long one update may stay unfinished (``deadline_s``: a peer that never answers or
    never sends new_key_update would otherwise hold the connection on its old keys)."""

    rate: float = 2.0
    burst: float = 10.0
    deadline_s: float = 10.0


@dataclass(slots=True)
class UpdateStats:
    """What the updates of one connection did (for its log line and metrics)."""

    completed: int = 0
    failed: int = 0
    abandoned: int = 0  # cut short by the connection's clean end (its key is wasted)
    initiated: int = 0
    ignored_crossing: int = 0
    superseded: int = 0  # prepared, then not sent (the peer's update came first)
    key_ids: list[str] = field(default_factory=list)
    last_completed: float | None = None


class Installer(Protocol):
    """What the state machine needs from its record layer (kept narrow on purpose)."""

    def send_handshake(self, message: bytes) -> None:
        """Queue a handshake message under the current write keys."""

    def install(self, read_secret: bytes | None, write_secret: bytes | None) -> None:
        """Switch one or both directions to new application traffic secrets."""


class FreshKeyUpdates:
    """Extended Key Update for one established connection."""

    def __init__(
        self,
        *,
        layer: Installer,
        schedule: KeySchedule,
        hybrid: HybridKem,
        keys: ExchangeContext,
        is_client: bool,
        originator: bool,
        policy: UpdatePolicy | None = None,
    ) -> None:
        self._layer = layer
        self._schedule = schedule
        self._hybrid = hybrid
        self._keys = keys
        self._is_client = is_client
        # The side that originated the handshake's QKD key id originates the updates' too,
        # so each side keeps its KME role (master / slave) for the connection's life.
        self._originator = originator
        policy = policy or UpdatePolicy()
        self._requests = TokenBucket(policy.rate, policy.burst)
        self._deadline_s = policy.deadline_s
        self._since: float | None = None  # when the running update started
        # Time the running update has waited while this side was not holding it up itself,
        # and when that was last judged (see overdue).
        self._waited = 0.0
        self._judged = 0.0
        self.state = State.IDLE
        self.stats = UpdateStats()
        self._kex: ClientKeyExchange | ServerKeyExchange | None = None
        self._request = b""
        self._peer_share = b""
        self._pending_read: bytes | None = None
        self._steps: Steps[Any] | None = None
        self._then: Callable[[], list[RecordEvent]] | None = None

    @property
    def group(self) -> int:
        """The connection's group code point: the only group an update may use."""
        return self._hybrid.group.code_point

    @property
    def originator(self) -> bool:
        """True if this side originates the QKD key ids (as it did in the handshake)."""
        return self._originator

    @property
    def can_initiate(self) -> bool:
        """False for the non-originating side of an ETSI 004 connection: its peer would
        have to originate a key through ETSI 014, which an ETSI 004 endpoint lacks."""
        return self._originator or self._keys.options.api is not KeyApi.ETSI_004

    @property
    def waiting(self) -> bool:
        """True while a key request waits for its answer."""
        return self._steps is not None

    # ------------------------------------------------------------------ initiating

    def prepare(self) -> tuple[ClientKeyExchange, KeySteps[None]]:
        """A fresh initiator key exchange and the step that prepares its share (run it with
        the key sources, then call :meth:`begin`)."""
        flow = Flow.CLIENT_INITIATED if self._originator else Flow.SERVER_INITIATED
        kex = ClientKeyExchange([self._hybrid], _UpdateContext(self._keys, flow))
        return kex, kex.offer(self.group)

    def begin(self, kex: ClientKeyExchange, now: float) -> list[RecordEvent]:
        """Send the request prepared by ``kex``; if an update started meanwhile (the peer's),
        the prepared key is wasted instead."""
        if self.state is not State.IDLE:
            return self.discard(kex)
        self._since, self._waited = now, 0.0
        share, _ = kex.key_share(self.group)
        self._kex = kex
        self._request = encode(KEY_UPDATE_REQUEST, self.group, share)
        self._layer.send_handshake(self._request)
        self.state = State.AWAIT_RESPONSE
        self.stats.initiated += 1
        return []

    def discard(self, kex: ClientKeyExchange, failed: bool = False) -> list[RecordEvent]:
        """A prepared update that will not be sent (the peer's update came first, the stream
        ended, or ``failed``: preparing it failed): its key is wasted and counted."""
        if failed:
            self.stats.failed += 1
            return self._settle(kex, False, "update_failed")
        self.stats.superseded += 1
        return self._settle(kex, False, "update_superseded")

    # ------------------------------------------------------------------- receiving

    def on_message(self, message: bytes, parsed: EkuMessage, now: float) -> list[RecordEvent]:
        """Handle one ExtendedKeyUpdate (``message``: the whole handshake message)."""
        if parsed.subtype == NEW_KEY_UPDATE:
            return self._on_new_key_update()
        if parsed.subtype == KEY_UPDATE_RESPONSE and self.state is not State.AWAIT_RESPONSE:
            raise RemoteProtocolError("unexpected key_update_response", Alert.UNEXPECTED_MESSAGE)
        if parsed.group != self.group:
            raise RemoteProtocolError("key update in another group", Alert.ILLEGAL_PARAMETER)
        if parsed.subtype == KEY_UPDATE_RESPONSE:
            return self._on_response(message, parsed.key_exchange)
        assert parsed.subtype == KEY_UPDATE_REQUEST
        return self._on_request(message, parsed.key_exchange, now)

    def _on_request(self, message: bytes, share: bytes, now: float) -> list[RecordEvent]:
        events: list[RecordEvent] = []
        if self.state is State.AWAIT_RESPONSE:
            ours = self._kex.key_share(self.group)[0] if self._kex else b""
            if share == ours:
                raise RemoteProtocolError(
                    "crossing requests with equal shares", Alert.UNEXPECTED_MESSAGE
                )
            if share < ours:
                self.stats.ignored_crossing += 1
                return []  # the peer drops its request too: ours stands
            # Ours is the one ignored: its key is wasted, we answer the peer's.
            kex, self._kex = self._kex, None
            assert isinstance(kex, ClientKeyExchange)
            events += self._settle(kex, False, "update_crossed")
            self.stats.ignored_crossing += 1
            self.state = State.IDLE
        if self.state is not State.IDLE:
            raise RemoteProtocolError(
                "key update request during an update", Alert.UNEXPECTED_MESSAGE
            )
        if not self._requests.take(now):
            raise RemoteProtocolError("key update request flood", Alert.UNEXPECTED_MESSAGE)
        kex = ServerKeyExchange([self._hybrid], _UpdateContext(self._keys))
        self._kex = kex
        self._since, self._waited = now, 0.0
        self._request = message
        self._peer_share = share
        self.state = State.RESPONDER_KEYS
        events += self._run(kex.on_update_request(self._hybrid, share), self._respond)
        return events

    def _respond(self) -> list[RecordEvent]:
        kex = self._kex
        assert isinstance(kex, ServerKeyExchange)
        share, _ = kex.key_share(self.group)
        secret = kex.shared_secret(self.group, self._peer_share)
        response = encode(KEY_UPDATE_RESPONSE, self.group, share)
        client, server = self._schedule.next(secret, self._request, response)
        self._layer.send_handshake(response)  # under the old keys
        ours, theirs = (client, server) if self._is_client else (server, client)
        self._layer.install(None, ours)
        self._pending_read = theirs
        self.state = State.AWAIT_NKU
        return []

    def _on_response(self, message: bytes, share: bytes) -> list[RecordEvent]:
        kex = self._kex
        assert isinstance(kex, ClientKeyExchange)
        self.state = State.INITIATOR_KEYS
        self._peer_share = share
        hello = ServerHello(hello_retry=False, group=self.group, key_exchange=share)

        def complete() -> list[RecordEvent]:
            secret = kex.shared_secret(self.group, share)
            client, server = self._schedule.next(secret, self._request, message)
            ours, theirs = (client, server) if self._is_client else (server, client)
            self._layer.install(theirs, None)
            self._layer.send_handshake(encode(NEW_KEY_UPDATE))  # under the old keys
            self._layer.install(None, ours)
            return self._completed(initiator=True)

        return self._run(kex.on_server_hello(hello), complete)

    def _on_new_key_update(self) -> list[RecordEvent]:
        if self.state is not State.AWAIT_NKU or self._pending_read is None:
            raise RemoteProtocolError("unexpected new_key_update", Alert.UNEXPECTED_MESSAGE)
        self._layer.install(self._pending_read, None)
        self._pending_read = None
        return self._completed(initiator=False)

    def _completed(self, initiator: bool) -> list[RecordEvent]:
        kex, self._kex = self._kex, None
        assert kex is not None
        key_id = kex.record.qkd_key_id
        self.state, self._since = State.IDLE, None
        self.stats.completed += 1
        if key_id:
            self.stats.key_ids.append(key_id)
        events = self._settle(kex, True, "")
        events.append(FreshKeysInstalled(self.stats.completed, initiator, key_id))
        return events

    # ------------------------------------------------------------------- key steps

    def _run(
        self, steps: KeySteps[Any], then: Callable[[], list[RecordEvent]]
    ) -> list[RecordEvent]:
        self._steps, self._then = steps.steps, then
        return self.answer(None)

    def answer(self, answer: KeyAnswer) -> list[RecordEvent]:
        """The answer to the last :class:`UpdateKeyNeeded`; raises :class:`ProtocolError`
        (the update failed; the caller fails the connection and calls :meth:`abandon`)."""
        assert self._steps is not None
        try:
            request = self._steps.send(answer)
        except StopIteration:
            then = self._then
            self._steps = self._then = None
            assert then is not None
            return then()
        except BaseException:
            self._steps = self._then = None
            raise
        return [UpdateKeyNeeded(request)]

    def late_answer(self, answer: KeyAnswer) -> None:
        """A key that arrived after its update ended (its deadline, the stream's failure):
        the KME delivered it all the same, so it is counted, as wasted. (A late ETSI 004
        stream is reclaimed by the KME when its TTL ends.)"""
        if isinstance(answer, QkdKey):
            self._keys.ledger.record_taken()
            self._keys.ledger.record_wasted("update_failed")

    def overdue(self, now: float, held: bool = False) -> bool:
        """True if the running update has waited longer than the policy's deadline.

        ``held``: since the last call, this side itself held the update up (its own reader
        was not reading, or its writes were stuck behind the peer's flow control). That
        span does not count: a slow consumer is not a peer that refuses to answer."""
        if self._since is None:
            return False
        start = max(self._since, self._judged)
        if not held:
            self._waited += max(0.0, now - start)
        self._judged = now
        return self._waited > self._deadline_s

    @property
    def deadline_s(self) -> float:
        """How long one update may stay unfinished."""
        return self._deadline_s

    def abandon(self, failed: bool = True) -> list[RecordEvent]:
        """The connection ended: whatever key an unfinished update holds is wasted, counted
        as failed unless the end was clean (``failed`` false: a close_notify either way)."""
        kex, self._kex = self._kex, None
        self._steps = self._then = None
        self._since = None
        if kex is None or self.state is State.IDLE:
            self.state = State.IDLE
            return []
        self.state = State.IDLE
        if not failed:
            self.stats.abandoned += 1
            return self._settle(kex, False, "update_abandoned")
        self.stats.failed += 1
        return self._settle(kex, False, "update_failed")

    def _settle(
        self, kex: ClientKeyExchange | ServerKeyExchange, success: bool, reason: str
    ) -> list[RecordEvent]:
        """Consume or waste the keys ``kex`` held; ETSI 004 closes go out as events."""
        steps = kex.finish(success, reason).steps
        events: list[RecordEvent] = []
        try:
            request = next(steps)
            while True:
                events.append(UpdateKeyNeeded(request))
                request = steps.send(None)
        except StopIteration:
            return events


class _UpdateContext:
    """The endpoint's key context as an update sees it: its own flow (the initiator's key
    id role), and no pre-authentication spend gate (the peer is authenticated by now)."""

    def __init__(self, base: ExchangeContext, flow: Flow | None = None) -> None:
        self._base = base
        self._options = (
            base.options if flow is None else dataclasses.replace(base.options, flow=flow)
        )

    @property
    def base(self) -> ExchangeContext:
        """The endpoint's own context (the driver answers key requests from it)."""
        return self._base

    @property
    def sources(self) -> KeySourcesPresent:
        """The endpoint's key sources."""
        return self._base.sources

    @property
    def options(self) -> QkdOptions:
        """The endpoint's options, with the update's flow."""
        return self._options

    @property
    def ledger(self) -> KeyLedger:
        """The endpoint's ledger: an update's key is counted like a handshake's."""
        return self._base.ledger

    @property
    def guard(self) -> KeyIdGuard:
        """The endpoint's replay guard: update key ids and handshake key ids alike."""
        return self._base.guard

    @property
    def gate(self) -> SpendGate | None:
        """No gate: it bounds KME work for unauthenticated hellos."""
        return None
