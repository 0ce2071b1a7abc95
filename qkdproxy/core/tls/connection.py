"""One TLS 1.3 handshake of a client or a server, without I/O, clocks or tasks.

In: bytes received (:meth:`TlsConnection.receive_data`, :meth:`~TlsConnection.receive_eof`),
the answer to a key request (:meth:`~TlsConnection.answer_key`) and timers
(:meth:`~TlsConnection.handle_timer`), each with the current time. Out: events
(:meth:`~TlsConnection.next_events`) and bytes to send (:meth:`~TlsConnection.data_to_send`).

The connection owns the hello gate (hellos are held back until the key exchange has what
it needs), the key exchange (whose KME calls come out as :class:`KeyNeeded`), a handshake
engine (:mod:`qkdproxy.core.tls.engine`: ours or tlslite), and from the end of the
handshake the record layer
(:attr:`TlsConnection.records`). Its phase moves only along :data:`TRANSITIONS`.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any

from qkdproxy.core.errors import LocalProtocolError, QkdproxyError
from qkdproxy.core.hybrid import HybridKem, KeyPairReserve
from qkdproxy.core.tls.eku_state import FreshKeyUpdates, UpdatePolicy
from qkdproxy.core.tls.engine import (
    AbruptCloseError,
    EngineSpec,
    HandOverError,
    LocalAlertError,
    RemoteAlertError,
)
from qkdproxy.core.tls.events import Failed, RecordEvent, Side
from qkdproxy.core.tls.hello import (
    DuplicateExtensionError,
    HelloParseError,
    read_client_hello,
    read_server_hello,
)
from qkdproxy.core.tls.identity import PeerIdentity
from qkdproxy.core.tls.keyexchange import (
    ClientKeyExchange,
    ExchangeContext,
    Flow,
    HandshakeRecord,
    HandshakeRejectedError,
    KeyAnswer,
    KeyRequest,
    KeySteps,
    ServerKeyExchange,
    Steps,
)
from qkdproxy.core.tls.record_layer import RecordLayer
from qkdproxy.core.tls.verify import PeerPolicy, PeerRejectedError
from qkdproxy.core.tls.wire import (
    TLS13_CIPHER_SUITES,
    Alert,
    GateEvent,
    HandshakeType,
    HeldHello,
    HelloGate,
    Release,
    plaintext_alert,
)

log = logging.getLogger(__name__)


class Outcome(Enum):
    """Why a handshake failed, for decisions and bounded metric labels (never the text)."""

    ALERT = "alert"  # a fatal alert, ours or the peer's (see ``remote``)
    TIMEOUT = "timeout"
    PEER_CLOSED = "peer_closed"
    UNVERIFIED = "unverified"  # the peer's identity was never checked
    INTERNAL = "internal"  # a bug of ours: logged with its traceback


class HandshakeError(QkdproxyError):
    """A handshake that did not complete; the only exception the handshake APIs raise."""

    def __init__(
        self,
        reason: str,
        alert: int | None = None,
        remote: bool = False,
        key_source: bool = False,
        outcome: Outcome = Outcome.ALERT,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.alert = alert
        self.remote = remote
        self.key_source = key_source
        self.outcome = outcome
        # What the failed handshake had got to: its flow and the key id it used, if any.
        self.record = HandshakeRecord()

    @property
    def may_be_kme(self) -> bool:
        """Our own KME failed. A peer's alert never counts: before the handshake completes
        it is unauthenticated, and an on-path attacker could inject one to force a
        downgrade."""
        return self.key_source


@dataclass(frozen=True, slots=True)
class KeyNeeded:
    """The key exchange needs this key-source call answered (:meth:`answer_key`)."""

    request: KeyRequest


@dataclass(frozen=True, slots=True)
class HandshakeComplete:
    """The handshake completed and the peer is who the policy accepts."""

    record: HandshakeRecord
    peer: PeerIdentity
    cipher: str
    alpn: str | None


Event = KeyNeeded | HandshakeComplete | RecordEvent


class Phase(Enum):
    """Where a connection is."""

    START = "start"
    HANDSHAKE = "handshake"  # the engine runs (or waits for the first ClientHello)
    KEYS = "keys"  # a key-exchange step waits for the answer to a key request
    ESTABLISHED = "established"  # the record layer has taken over
    FAILED = "failed"


# The one table of legal moves; anything else is a bug of ours (LocalProtocolError).
TRANSITIONS: frozenset[tuple[Phase, Phase]] = frozenset(
    {
        (Phase.START, Phase.HANDSHAKE),
        (Phase.START, Phase.KEYS),
        (Phase.START, Phase.FAILED),
        (Phase.KEYS, Phase.HANDSHAKE),
        (Phase.KEYS, Phase.FAILED),
        (Phase.HANDSHAKE, Phase.KEYS),
        (Phase.HANDSHAKE, Phase.ESTABLISHED),
        (Phase.HANDSHAKE, Phase.FAILED),
    }
)


@dataclass(frozen=True, slots=True)
class ConnectionConfig:
    """What every handshake of one endpoint shares (the engine's forms prepared once)."""

    groups: Sequence[HybridKem]
    peer: PeerPolicy
    engine: EngineSpec
    server_name: str | None
    alpn: list[bytes] | None
    handshake_timeout: float
    # Extended Key Update: offer it; refuse a peer that does not offer it too.
    fresh_key_update: bool = False
    require_fresh_key_update: bool = False
    # How long one update may wait for the peer (None: handshake_timeout).
    fresh_key_deadline: float | None = None
    # A client's key pairs generated ahead (the I/O layer replenishes it after the hello of
    # each per-connection dial; a pool's tunnel handshakes only take from it).
    spares: KeyPairReserve | None = None


class TlsConnection:
    """A client or server handshake, then its record layer (see the module docstring)."""

    def __init__(
        self,
        config: ConnectionConfig,
        keys: ExchangeContext,
        *,
        is_client: bool,
        wall_time: datetime,
    ) -> None:
        self.config = config
        self.is_client = is_client
        # Certificates are checked against the time the handshake started (passed in).
        self._wall_time = wall_time
        self.phase = Phase.START
        self.error: HandshakeError | None = None
        self.records: RecordLayer | None = None
        self.verified: PeerIdentity | None = None
        self._deadline: float | None = None
        self._events: list[Event] = []
        self._out: list[bytes | bytearray] = []
        self._eof = False
        self._backlog: deque[GateEvent] = deque()
        self._engine_started = False
        self._key_steps: Steps[Any] | None = None
        self._then: Callable[[Any], None] | None = None
        self._first_hello_seen = False
        self._retried = False
        self._leftover = b""
        self.kex: ClientKeyExchange | ServerKeyExchange
        if is_client:
            self.kex = ClientKeyExchange(config.groups, keys, config.spares)
            self._gate = HelloGate(HandshakeType.SERVER_HELLO)
        else:
            self.kex = ServerKeyExchange(config.groups, keys)
            self._gate = HelloGate(HandshakeType.CLIENT_HELLO)
        self._engine = config.engine.new(
            self.kex,
            is_client=is_client,
            chain_check=self._check_server_chain if is_client else None,
            alpn=config.alpn,
            server_name=config.server_name,
        )
        self.keys = keys  # the endpoint's key context (Extended Key Updates draw from it)
        self._engine.eku_offer = config.fresh_key_update

    # ----------------------------------------------------------------- inputs

    def start(self, now: float) -> None:
        """Begin: a client prepares and sends its ClientHello; both arm the deadline."""
        self._deadline = now + self.config.handshake_timeout
        if not self.is_client:
            self._move(Phase.HANDSHAKE)
            return
        self._guarded(lambda: self._start_client(now))

    def _start_client(self, now: float) -> None:
        first = self.config.groups[0]

        def send_hello(_: object) -> None:
            self._engine.start_client([g.group for g in self.config.groups], first.group)
            self._engine_started = True

        self._run_keys(self.kex_client.offer(first.group.code_point, now), send_hello)
        self._advance()

    def receive_data(self, data: bytes, now: float) -> None:
        """Bytes from the peer."""
        if self.phase is Phase.ESTABLISHED:
            raise LocalProtocolError(
                "the record layer reads after the handshake", Alert.INTERNAL_ERROR
            )
        if self.phase is Phase.FAILED or not data:
            return
        self._backlog.extend(self._gate.feed(data))
        self._guarded(self._advance)

    def receive_eof(self, now: float) -> None:
        """The peer closed its sending side."""
        if self.phase in (Phase.FAILED, Phase.ESTABLISHED):
            return
        self._eof = True
        self._engine.feed_eof()
        self._guarded(self._advance)

    def answer_key(self, answer: KeyAnswer, now: float) -> None:
        """The answer to the last :class:`KeyNeeded` (a :class:`KeyFailure` if it failed)."""
        if self.phase is Phase.FAILED:
            return
        if self.phase is not Phase.KEYS or self._key_steps is None:
            raise LocalProtocolError("no key request is waiting", Alert.INTERNAL_ERROR)
        self._guarded(lambda: self._answered(answer))

    def transport_failed(self) -> None:
        """The transport broke (a write failed): the peer is gone."""
        reason = "peer closed the connection during the handshake"
        self._fail(HandshakeError(reason, remote=True, outcome=Outcome.PEER_CLOSED))

    def handle_timer(self, now: float) -> None:
        """Fail the handshake once its deadline has passed."""
        if (
            self._deadline is not None
            and now >= self._deadline
            and self.phase
            not in (
                Phase.ESTABLISHED,
                Phase.FAILED,
            )
        ):
            self._fail(HandshakeError("handshake timed out", outcome=Outcome.TIMEOUT))

    def abort(self) -> None:
        """The driver gives up (cancelled): settle the keys, send nothing more."""
        if self.phase not in (Phase.ESTABLISHED, Phase.FAILED):
            self.phase = Phase.FAILED
            self._settle(False)

    # ---------------------------------------------------------------- outputs

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` must run next (None: no timer)."""
        return None if self.phase in (Phase.ESTABLISHED, Phase.FAILED) else self._deadline

    def next_events(self) -> list[Event]:
        """Everything that happened since the last call, in order."""
        events, self._events = self._events, []
        return events

    def data_to_send(self) -> bytes:
        """Bytes for the peer, in order."""
        if self.records is None:
            self._out.append(self._engine.take_output())
        else:
            self._out.append(self.records.data_to_send())
        out = b"".join(self._out)
        self._out.clear()
        return out

    @property
    def waiting_for_key(self) -> bool:
        """True while a :class:`KeyNeeded` waits for its answer."""
        return self.phase is Phase.KEYS

    # ---------------------------------------------------------------- internals

    def _move(self, to: Phase) -> None:
        if (self.phase, to) not in TRANSITIONS:
            raise LocalProtocolError(
                f"illegal transition {self.phase.value} -> {to.value}", Alert.INTERNAL_ERROR
            )
        self.phase = to

    def _guarded(self, step: Callable[[], None]) -> None:
        """Run ``step``; turn whatever ends the handshake into one failure."""
        try:
            step()
        except HandshakeError as exc:
            self._fail(exc)
        except HandshakeRejectedError as exc:
            self._out.append(self._engine.take_output() + plaintext_alert(exc.alert))
            self._fail(HandshakeError(exc.reason, int(exc.alert), key_source=exc.key_source))
        except LocalAlertError as exc:
            self._fail(HandshakeError(exc.message, exc.description))
        except RemoteAlertError as exc:
            self._fail(HandshakeError(str(exc), exc.description, remote=True))
        except (AbruptCloseError, ConnectionError):
            reason = "peer closed the connection during the handshake"
            self._fail(HandshakeError(reason, remote=True, outcome=Outcome.PEER_CLOSED))
        except LocalProtocolError:
            raise
        except Exception as exc:
            # Our bug, or the engine's on input it does not expect (tlslite: a KeyError on an
            # unknown certificate OID): either way not the peer's fault. It ends this
            # connection only.
            log.error("internal error in a handshake", exc_info=exc)
            self._out.append(plaintext_alert(Alert.INTERNAL_ERROR))
            reason = f"handshake failed: internal error ({type(exc).__name__})"
            self._fail(HandshakeError(reason, Alert.INTERNAL_ERROR, outcome=Outcome.INTERNAL))

    def _fail(self, error: HandshakeError) -> None:
        if self.phase in (Phase.FAILED, Phase.ESTABLISHED):
            return
        self.phase = Phase.FAILED  # from any phase: failing is always legal
        error.record = self.kex.record
        self.error = error
        self._settle(False)
        side = Side.REMOTE if error.remote else Side.LOCAL
        self._events.append(Failed(error.alert, side, error.reason))

    def _settle(self, success: bool) -> None:
        """Settle the held keys; stream closes need no answer, so they go out as events."""
        for request in _drain(self.kex.finish(success)):
            self._events.append(KeyNeeded(request))

    def _run_keys(self, steps: KeySteps[Any], then: Callable[[Any], None]) -> None:
        self._key_steps, self._then = steps.steps, then
        self._move(Phase.KEYS)
        self._step_keys(None)

    def _answered(self, answer: KeyAnswer) -> None:
        self._step_keys(answer)
        self._advance()

    def _step_keys(self, answer: KeyAnswer) -> None:
        """Run the key step to its next request (a :class:`KeyNeeded`) or its end."""
        assert self._key_steps is not None
        try:
            request = self._key_steps.send(answer)
        except StopIteration as done:
            then = self._then
            self._key_steps = self._then = None
            self._move(Phase.HANDSHAKE)
            assert then is not None
            then(done.value)
            return
        self._events.append(KeyNeeded(request))

    def _advance(self) -> None:
        """Run as far as the input allows."""
        while self.phase is Phase.HANDSHAKE:
            if not self._feed_backlog():
                return  # a key step started
            if not self._engine_started:
                if self.is_client or not (
                    self._first_hello_seen or self._gate.passthrough or self._eof
                ):
                    return  # a client's hello waits for its key; a server for a ClientHello
                self._start_server()
            if self._engine.step():
                self._complete()
                return
            if not self._backlog:
                return

    def _feed_backlog(self) -> bool:
        """Hand gate events to the engine in order; False when a held hello started a key
        step."""
        while self._backlog:
            event = self._backlog.popleft()
            if isinstance(event, Release):
                self._engine.feed(event.data)
                continue
            self._on_hello(event)
            if self.phase is not Phase.HANDSHAKE:
                return False
        return True

    def _on_hello(self, hello: HeldHello) -> None:
        if self.is_client:
            try:
                parsed = read_server_hello(hello.body)
            except HelloParseError as exc:
                # tlslite crashes on some hellos this parser refuses (an empty key_share),
                # so the client answers them itself.
                raise HandshakeRejectedError(
                    Alert.DECODE_ERROR, f"malformed ServerHello: {exc}"
                ) from None

            if parsed.view.hello_retry:
                self._hello_retry()  # before the key step: a refused retry costs no key

            def after_server_hello(_: object) -> None:
                self._engine.feed_server_hello(hello, parsed)

            self._run_keys(self.kex_client.on_server_hello(parsed.view), after_server_hello)
            return
        self._first_hello_seen = True
        try:
            parsed_hello = read_client_hello(hello.body)
        except DuplicateExtensionError as exc:
            # tlslite would raise TLSInternalError on looking one of them up: an internal
            # error, logged as our bug, on any client's say-so.
            raise HandshakeRejectedError(
                Alert.ILLEGAL_PARAMETER, f"malformed ClientHello: {exc}"
            ) from None
        except HelloParseError:
            self._engine.feed(hello.records)  # the engine answers it with the right alert
            return
        client_hello = parsed_hello.view
        # No KME call for a hello tlslite will refuse anyway.
        if not client_hello.offers_tls13 or TLS13_CIPHER_SUITES.isdisjoint(
            client_hello.cipher_suites
        ):
            self._engine.feed_client_hello(hello, parsed_hello)
            return

        def after_client_hello(retry: bool) -> None:
            if retry:
                self._hello_retry()
            self._engine.feed_client_hello(hello, parsed_hello)

        self._run_keys(self.kex_server.on_client_hello(client_hello), after_client_hello)

    def _hello_retry(self) -> None:
        """The one HelloRetryRequest rule for both roles (RFC 8446 4.1.4): a handshake has
        at most one; the gate then holds exactly one more hello."""
        if self._retried:
            if self.is_client:
                raise HandshakeRejectedError(Alert.UNEXPECTED_MESSAGE, "second HelloRetryRequest")
            raise HandshakeRejectedError(Alert.ILLEGAL_PARAMETER, "no key share after retry")
        self._retried = True
        self._gate.allow_another()

    @property
    def kex_client(self) -> ClientKeyExchange:
        assert isinstance(self.kex, ClientKeyExchange)
        return self.kex

    @property
    def kex_server(self) -> ServerKeyExchange:
        assert isinstance(self.kex, ServerKeyExchange)
        return self.kex

    def _start_server(self) -> None:
        # The engine starts only now, with the chosen group as its only choice, so it
        # cannot pick a group other than the one the key exchange prepared.
        chosen = self.kex_server.chosen
        groups = [chosen.group] if chosen else [g.group for g in self.config.groups]
        self._engine.start_server(groups)
        self._engine_started = True

    def _check_server_chain(self, chain: list[bytes]) -> tuple[int, str] | None:
        try:
            self.verified = self.config.peer.verify_server(chain, self._wall_time)
        except PeerRejectedError as exc:
            return int(exc.alert), exc.reason
        return None

    def _complete(self) -> None:
        engine = self._engine
        if not self.is_client:
            try:
                self.verified = self.config.peer.verify_client(engine.peer_chain, self._wall_time)
            except PeerRejectedError as exc:
                # Before any application data: the client learns why (encrypted alert).
                engine.send_alert(int(exc.alert), exc.reason)
        if self.verified is None:
            raise HandshakeError("peer identity was not verified", outcome=Outcome.UNVERIFIED)
        if self.config.require_fresh_key_update and not engine.eku_negotiated:
            engine.send_alert(
                int(Alert.HANDSHAKE_FAILURE), "peer does not offer Extended Key Update"
            )
        try:
            records, leftover = engine.hand_over()
        except HandOverError as exc:
            raise HandshakeError(f"handshake did not end cleanly: {exc}", remote=True) from None
        # The engine's last flight (a client's Finished) leaves before any record.
        self._out.append(engine.take_output())
        self._move(Phase.ESTABLISHED)
        self._settle(True)
        if engine.eku_negotiated:
            records.eku = self._fresh_key_updates(records)
        self.records = records
        alpn = engine.alpn
        self._events.append(
            HandshakeComplete(
                self.kex.record,
                self.verified,
                engine.cipher_name,
                alpn.decode("ascii", "replace") if alpn else None,
            )
        )
        self._leftover = leftover

    def _fresh_key_updates(self, records: RecordLayer) -> FreshKeyUpdates:
        """The Extended Key Update state of the new record layer, in the handshake's group,
        with the handshake's key-originating side originating the updates' keys too."""
        group = self.kex.record.group
        hybrid = next(g for g in self.config.groups if g.group.name == group)
        flow = self.kex.record.flow
        if flow is None:  # a PQ-only group: no QKD key, nobody originates one
            originator = self.is_client
        else:
            originator = self.is_client == (flow is Flow.CLIENT_INITIATED)
        return FreshKeyUpdates(
            layer=records,
            schedule=self._engine.key_schedule(),
            hybrid=hybrid,
            keys=self.keys,
            is_client=self.is_client,
            originator=originator,
            # An update is a handshake inside the connection: the same time limit.
            policy=UpdatePolicy(
                deadline_s=self.config.fresh_key_deadline or self.config.handshake_timeout
            ),
        )

    def take_leftover(self) -> bytes:
        """Bytes that arrived with the end of the handshake, for the record layer."""
        leftover, self._leftover = self._leftover, b""
        return leftover


def _drain(steps: KeySteps[None]) -> Iterator[KeyRequest]:
    """The requests of a step that needs no answers (settling keys closes streams only)."""
    generator = steps.steps
    try:
        request = next(generator)
        while True:
            yield request
            request = generator.send(None)
    except StopIteration:
        return
