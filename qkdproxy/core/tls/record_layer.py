"""The TLS 1.3 protocol after the handshake, entirely ours and without I/O (RFC 8446 4.6, 5, 6).

tlslite runs the handshake; from the moment both traffic secrets exist, every record in
both directions passes through :class:`RecordLayer`: application data, KeyUpdate (sent and
received, with update_requested), NewSessionTicket, close_notify and fatal alerts. Bytes
and the current time go in; events (:mod:`qkdproxy.core.tls.events`) and bytes to send come out.

Rules this layer holds that tlslite did not:
- every record is protected: an unprotected one (a plaintext alert at sequence number 0
  after a KeyUpdate, say) is refused with unexpected_message, so nobody on path can end a
  stream as if the peer had closed it;
- a peer's KeyUpdate(update_requested) is answered at most once per batch of received
  bytes, and only within a token budget; a peer that exceeds it gets an alert.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from qkdproxy.core.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from qkdproxy.core.ratelimit import TokenBucket
from qkdproxy.core.tls.eku import EXTENDED_KEY_UPDATE
from qkdproxy.core.tls.eku import parse as parse_eku
from qkdproxy.core.tls.events import (
    DataReceived,
    Failed,
    KeysUpdated,
    PeerClosed,
    RecordEvent,
    Side,
    Truncated,
)
from qkdproxy.core.tls.keyexchange import ClientKeyExchange, KeyAnswer, KeySteps
from qkdproxy.core.tls.records import (
    APPLICATION_DATA,
    HEADER,
    MAX_CIPHERTEXT,
    MAX_PLAINTEXT,
    TAG_LENGTH,
    TrafficKeys,
    hkdf_expand_label,
    open_record,
    open_records,
    seal,
    seal_inner,
)
from qkdproxy.core.tls.wire import Alert, ContentType, alert_name

if TYPE_CHECKING:
    from qkdproxy.core.tls.eku_state import FreshKeyUpdates

KEY_UPDATE = 24
NEW_SESSION_TICKET = 4
UPDATE_NOT_REQUESTED = 0
UPDATE_REQUESTED = 1
# A post-handshake message larger than this is refused (a NewSessionTicket is at most
# about 128 KiB: a 64 KiB ticket and 64 KiB of extensions).
MAX_HANDSHAKE_MESSAGE = 1 << 17
ALERT_LEVEL_WARNING = 1
ALERT_LEVEL_FATAL = 2


@dataclass(frozen=True, slots=True)
class CipherSuite:
    """What a TLS 1.3 cipher suite means for the record layer."""

    code: int
    hash_name: str
    digest_size: int
    key_length: int
    chacha: bool = False

    def aead(self, key: bytes) -> AESGCM | ChaCha20Poly1305:
        """The suite's AEAD with ``key``."""
        return ChaCha20Poly1305(key) if self.chacha else AESGCM(key)


CIPHER_SUITES = {
    0x1301: CipherSuite(0x1301, "sha256", 32, 16),
    0x1302: CipherSuite(0x1302, "sha384", 48, 32),
    0x1303: CipherSuite(0x1303, "sha256", 32, 32, chacha=True),
}


class Direction:
    """One direction's traffic secret, AEAD, IV and record sequence number."""

    __slots__ = ("keys", "secret", "seqnum", "suite")

    def __init__(self, suite: CipherSuite, secret: bytes, seqnum: int = 0) -> None:
        self.suite = suite
        self.secret = secret
        self.seqnum = seqnum
        key = hkdf_expand_label(secret, b"key", suite.key_length, suite.hash_name)
        iv = hkdf_expand_label(secret, b"iv", 12, suite.hash_name)
        self.keys = TrafficKeys(suite.aead(key), int.from_bytes(iv, "big"), self)

    def updated(self) -> Direction:
        """The next generation of keys (RFC 8446 7.2), from sequence number 0."""
        suite = self.suite
        next_secret = hkdf_expand_label(
            self.secret, b"traffic upd", suite.digest_size, suite.hash_name
        )
        return Direction(suite, next_secret)


@dataclass(frozen=True, slots=True)
class KeyUpdatePolicy:
    """How many KeyUpdates a peer may send before it is taken for a flood (and the
    connection ends with unexpected_message).

    ``rate`` per second after a ``burst`` of KeyUpdate(update_requested) are answered;
    ``any_rate`` and ``any_burst`` bound every KeyUpdate, requested or not: generous for a
    peer that rekeys on a byte budget, and a ceiling on the CPU a flood can cost.
    """

    rate: float = 4.0
    burst: float = 32.0
    any_rate: float = 200.0
    any_burst: float = 2000.0


class Phase(Enum):
    """Where a record layer is; every phase but OPEN is final."""

    OPEN = "open"
    CLOSED = "closed"  # the peer's close_notify, or ours: nothing more is sent
    FAILED = "failed"  # a fatal alert either way


def _missing(buffer: bytearray) -> int:
    """How many bytes the record at the front of ``buffer`` still lacks: 0 when there is
    none, when it is whole, or when its header already says it must be refused (it is
    opened, and refused, at once rather than after the length it claims)."""
    if not buffer:
        return 0
    if len(buffer) < HEADER.size:
        return HEADER.size - len(buffer)  # then the rest, once the length is known
    kind: int
    length: int
    kind, _version, length = HEADER.unpack_from(buffer)
    if kind != APPLICATION_DATA or not TAG_LENGTH < length <= MAX_CIPHERTEXT:
        return 0
    return max(0, HEADER.size + length - len(buffer))


class RecordLayer:
    """The protected record stream of an established TLS 1.3 connection (sans I/O).

    Feed it with :meth:`receive` (bytes and the current time) and :meth:`receive_eof`;
    send with :meth:`send_data`, :meth:`update_keys`, :meth:`close` and :meth:`fail`; take
    what must go to the peer from :meth:`data_to_send` after each call.
    """

    def __init__(
        self,
        read: Direction,
        write: Direction,
        *,
        is_client: bool,
        send_limit: int = MAX_PLAINTEXT,
        policy: KeyUpdatePolicy | None = None,
    ) -> None:
        self.read = read
        self.write = write
        self.is_client = is_client
        self.send_limit = min(send_limit, MAX_PLAINTEXT)
        policy = policy or KeyUpdatePolicy()
        self._answers = TokenBucket(policy.rate, policy.burst)
        self._updates = TokenBucket(policy.any_rate, policy.any_burst)
        self.phase = Phase.OPEN
        self._inbound = bytearray()
        self._handshake = bytearray()
        self._out: list[bytes | bytearray] = []
        self._answer_due = False  # a KeyUpdate answer is owed for the current batch
        # Counters for tests and metrics: KeyUpdates received and answers sent.
        self.key_updates_received = 0
        self.key_updates_answered = 0
        # Extended Key Update, when both peers negotiated it (set by the hand-over).
        self.eku: FreshKeyUpdates | None = None

    # ------------------------------------------------------------------ receiving

    def receive(self, data: bytes | bytearray | memoryview, now: float) -> list[RecordEvent]:
        """Take bytes from the transport; returns what they meant, in order. Nothing keeps
        a reference to ``data``: the caller may reuse its buffer right after."""
        if self.phase is not Phase.OPEN:
            return []  # bytes after the end are nobody's business
        events: list[RecordEvent] = []
        self._answer_due = False
        # Records are opened straight from the transport's bytes: of a record left
        # incomplete by the last receive only the missing bytes are copied over, and only
        # an incomplete tail (or what waits behind an Extended Key Update) is kept.
        view = memoryview(data)
        used = 0
        try:
            while self._inbound and self._can_open():
                # A record is opened only once it is whole: a peer cutting records into
                # tiny segments must not cost a decryption attempt per segment.
                if missing := _missing(self._inbound):
                    if used == len(view):
                        break
                    self._inbound += view[used : used + missing]
                    used = min(len(view), used + missing)
                    continue
                opened = self._open_from(self._inbound, now, events)
                del self._inbound[:opened]
                if not opened:
                    break  # nothing could be opened (cannot happen to a whole record)
            if not self._inbound and used < len(view):
                used += self._open_from(view[used:], now, events)
        except RemoteProtocolError as exc:
            events.append(self._refuse(exc))
        except ProtocolError as exc:  # an update's key step failed (KME, key id)
            events.append(self.fail(Alert(exc.alert), exc.reason))
        finally:
            if self.phase is Phase.OPEN:
                self._inbound += view[used:]
            view.release()
        if self._answer_due and self.phase is Phase.OPEN:
            self._send_key_update(requested=False)
            self.key_updates_answered += 1
            events.append(KeysUpdated("write"))
        return events

    def _can_open(self) -> bool:
        return self.phase is Phase.OPEN and not self.update_waiting

    def _open_from(
        self, buffer: bytes | bytearray | memoryview, now: float, events: list[RecordEvent]
    ) -> int:
        """Open the complete records at the front of ``buffer``; returns the bytes used."""
        # One cursor per batch: deleting record by record from the front of a large buffer
        # would cost a copy of the rest each time.
        view = memoryview(buffer)
        pos = 0
        try:
            while self._can_open():
                # Data right behind data opened in this receive joins its buffer: one
                # DataReceived per receive, not one per batch of records.
                last = events[-1].data if events and isinstance(events[-1], DataReceived) else None
                into = last if isinstance(last, bytearray) else None
                opened = open_records(self.read.keys, view[pos:], into)
                if opened.consumed:
                    if self._handshake:
                        raise RemoteProtocolError(
                            "application data inside a handshake message",
                            Alert.UNEXPECTED_MESSAGE,
                        )
                    pos += opened.consumed
                    if opened.data is not into:  # a new buffer (holding into's bytes first)
                        if into is not None:
                            events[-1] = DataReceived(opened.data)
                        elif opened.data:
                            events.append(DataReceived(opened.data))
                if not opened.handoff:
                    break
                record = open_record(self.read.keys, view[pos:])
                if record is None:
                    break
                pos += record.size
                self._on_record(record.content_type, record.content, now, events)
        finally:
            view.release()
        return pos

    def receive_eof(self) -> list[RecordEvent]:
        """The transport ended: a truncation unless the peer had closed (or we failed)."""
        if self.phase is not Phase.OPEN:
            return []
        self.phase = Phase.FAILED
        self._abandon_update()
        return [Truncated("peer closed the transport without close_notify")]

    def _on_record(
        self, content_type: int, content: bytes, now: float, events: list[RecordEvent]
    ) -> None:
        """Handle one record the data fast path did not take."""
        if content_type == ContentType.APPLICATION_DATA:
            # Reached only for records the fast path refused for their size or padding.
            if self._handshake:
                raise RemoteProtocolError(
                    "application data inside a handshake message", Alert.UNEXPECTED_MESSAGE
                )
            if content:
                events.append(DataReceived(content))
            return
        if content_type == ContentType.ALERT:
            if self._handshake:
                raise RemoteProtocolError(
                    "alert inside a handshake message", Alert.UNEXPECTED_MESSAGE
                )
            self._on_alert(content, events)
            return
        if content_type == ContentType.HANDSHAKE:
            if not content:
                raise RemoteProtocolError("empty handshake record", Alert.UNEXPECTED_MESSAGE)
            self._handshake += content
            self._on_handshake(now, events)
            return
        raise RemoteProtocolError(
            f"protected record of type {content_type}", Alert.UNEXPECTED_MESSAGE
        )

    def _on_alert(self, content: bytes, events: list[RecordEvent]) -> None:
        if len(content) != 2:
            raise RemoteProtocolError("malformed alert", Alert.DECODE_ERROR)
        level, description = content
        if description == Alert.CLOSE_NOTIFY:
            # TLS 1.3 allows half-close, but this product carries its own end-of-stream
            # signal: the peer's close_notify ends the connection both ways.
            self._send_alert(Alert.CLOSE_NOTIFY, ALERT_LEVEL_WARNING)
            self.phase = Phase.CLOSED
            self._abandon_update(failed=False)
            events.append(PeerClosed())
        elif description == Alert.USER_CANCELED and level == ALERT_LEVEL_WARNING:
            return  # followed by close_notify (RFC 8446 6.1)
        else:
            self.phase = Phase.FAILED
            self._abandon_update()
            name = alert_name(description)
            events.append(Failed(description, Side.REMOTE, f"peer sent alert {name}"))

    def _on_handshake(self, now: float, events: list[RecordEvent]) -> None:
        while len(self._handshake) >= 4:
            msg_type = self._handshake[0]
            length = int.from_bytes(self._handshake[1:4], "big")
            if length > MAX_HANDSHAKE_MESSAGE:
                raise RemoteProtocolError(
                    f"handshake message of {length} bytes", Alert.UNEXPECTED_MESSAGE
                )
            if len(self._handshake) < 4 + length:
                break
            body = bytes(self._handshake[4 : 4 + length])
            del self._handshake[: 4 + length]
            if msg_type == KEY_UPDATE:
                self._on_key_update(body, now, events)
            elif msg_type == EXTENDED_KEY_UPDATE and self.eku is not None:
                if self._handshake:
                    # Keys may change after it: it must end its record (RFC 8446 5.1).
                    raise RemoteProtocolError(
                        "ExtendedKeyUpdate not at the end of its record", Alert.UNEXPECTED_MESSAGE
                    )
                message = bytes([msg_type]) + length.to_bytes(3, "big") + body
                events.extend(self.eku.on_message(message, parse_eku(body), now))
            elif msg_type == NEW_SESSION_TICKET and self.is_client:
                continue  # qkdproxy never resumes: a ticket is dropped unread
            else:
                raise RemoteProtocolError(
                    f"handshake message {msg_type} after the handshake", Alert.UNEXPECTED_MESSAGE
                )

    def _on_key_update(self, body: bytes, now: float, events: list[RecordEvent]) -> None:
        if len(body) != 1:
            raise RemoteProtocolError("malformed KeyUpdate", Alert.DECODE_ERROR)
        if body[0] not in (UPDATE_NOT_REQUESTED, UPDATE_REQUESTED):
            raise RemoteProtocolError("KeyUpdate with unknown request", Alert.ILLEGAL_PARAMETER)
        if self._handshake:
            # The new keys apply from the next record (RFC 8446 5.1).
            raise RemoteProtocolError(
                "KeyUpdate not at the end of its record", Alert.UNEXPECTED_MESSAGE
            )
        if not self._updates.take(now):
            raise RemoteProtocolError("KeyUpdate flood", Alert.UNEXPECTED_MESSAGE)
        self.key_updates_received += 1
        self.read = self.read.updated()
        requested = body[0] == UPDATE_REQUESTED
        events.append(KeysUpdated("read", requested))
        if requested and not self._answer_due:
            # One answer per batch: only the first request of a batch spends a token.
            if not self._answers.take(now):
                raise RemoteProtocolError("KeyUpdate request flood", Alert.UNEXPECTED_MESSAGE)
            self._answer_due = True

    def _refuse(self, exc: RemoteProtocolError) -> Failed:
        """The peer broke the protocol: tell it why (protected) and stop."""
        self._send_alert(exc.alert, ALERT_LEVEL_FATAL)
        self.phase = Phase.FAILED
        self._abandon_update()
        return Failed(exc.alert, Side.LOCAL, exc.reason)

    # -------------------------------------------------------------------- sending

    def send_data(
        self, data: bytes | bytearray | memoryview, frame_type: int | None = None
    ) -> None:
        """Queue application bytes, one record per ``send_limit`` bytes; with
        ``frame_type`` each record is one peer-protocol frame of them (see :func:`seal`)."""
        self._require_open("send data")
        if data:
            self._out.append(seal(self.write.keys, data, self.send_limit, frame_type))

    def update_keys(self, request_peer: bool = False) -> None:
        """Queue a KeyUpdate and switch to fresh sending keys."""
        self._require_open("update keys")
        self._send_key_update(request_peer)

    def close(self) -> None:
        """Queue close_notify; nothing is sent after it. Does nothing once ended."""
        if self.phase is Phase.OPEN:
            self._send_alert(Alert.CLOSE_NOTIFY, ALERT_LEVEL_WARNING)
            self.phase = Phase.CLOSED
            self._abandon_update(failed=False)

    def fail(self, alert: Alert, reason: str) -> Failed:
        """End the connection with a fatal alert of ours (queued if still open)."""
        if self.phase is Phase.OPEN:
            self._send_alert(alert, ALERT_LEVEL_FATAL)
        self.phase = Phase.FAILED
        self._abandon_update()
        return Failed(alert, Side.LOCAL, reason)

    def abort(self) -> None:
        """The transport broke under the connection (a reset, a failed write): nothing more
        moves either way, and an unfinished update failed (its keys are settled now, not
        left outstanding, and not counted as a clean end)."""
        if self.phase is Phase.OPEN:
            self.phase = Phase.FAILED
            self._abandon_update()

    def data_to_send(self) -> bytes | bytearray:
        """Everything queued for the peer since the last call, in order."""
        if len(self._out) == 1:
            return self._out.pop()  # the common case, one write's records: no copy
        out = b"".join(self._out)
        self._out.clear()
        return out

    def _require_open(self, action: str) -> None:
        if self.phase is not Phase.OPEN:
            raise LocalProtocolError(
                f"cannot {action}: the connection is {self.phase.value}", Alert.INTERNAL_ERROR
            )

    def _send_key_update(self, requested: bool) -> None:
        message = bytes([KEY_UPDATE, 0, 0, 1, UPDATE_REQUESTED if requested else 0])
        self._out.append(seal_inner(self.write.keys, message, ContentType.HANDSHAKE))
        self.write = self.write.updated()

    def _send_alert(self, alert: int, level: int) -> None:
        self._out.append(seal_inner(self.write.keys, bytes([level, alert]), ContentType.ALERT))

    # ------------------------------------------------------- extended key update

    @property
    def update_waiting(self) -> bool:
        """True while an Extended Key Update waits for a key: inbound records wait too."""
        return self.eku is not None and self.eku.waiting

    def prepare_fresh_update(self) -> tuple[ClientKeyExchange, KeySteps[None]] | None:
        """Start an Extended Key Update of our own: the key exchange and the step that
        prepares its share (run it with the key sources, then :meth:`begin_fresh_update`).
        None when EKU was not negotiated, the stream ended or an update is in progress."""
        eku = self.eku
        if eku is None or self.phase is not Phase.OPEN or eku.state.value != "idle":
            return None
        if not eku.can_initiate:
            return None
        return eku.prepare()

    def begin_fresh_update(self, kex: ClientKeyExchange, now: float) -> list[RecordEvent]:
        """Send the request ``kex`` prepared (its key is wasted if the stream ended or the
        peer's update started meanwhile)."""
        assert self.eku is not None
        if self.phase is not Phase.OPEN:
            return self.eku.discard(kex)
        return self.eku.begin(kex, now)

    def check_fresh_update(self, now: float, held: bool = False) -> list[RecordEvent]:
        """Fail the connection if an Extended Key Update has run past its deadline: a peer
        that never answers must not keep the connection on old keys, silently defeating a
        fresh-key policy. Nothing while no update runs or it is in time; time in which
        this side ``held`` the update up itself does not count."""
        if self.eku is None or self.phase is not Phase.OPEN:
            return []
        if not self.eku.overdue(now, held):
            return []
        reason = f"fresh key update not finished within {self.eku.deadline_s:g} s"
        return [self.fail(Alert.HANDSHAKE_FAILURE, reason)]

    def answer_update_key(self, answer: KeyAnswer, now: float) -> list[RecordEvent]:
        """The answer to an :class:`UpdateKeyNeeded`; continues with the bytes that waited."""
        if self.eku is None:
            return []
        if not self.eku.waiting or self.phase is not Phase.OPEN:
            self.eku.late_answer(answer)
            return []
        try:
            events = self.eku.answer(answer)
        except RemoteProtocolError as exc:
            return [self._refuse(exc)]
        except ProtocolError as exc:
            return [self.fail(Alert(exc.alert), exc.reason)]
        if self.phase is Phase.OPEN and not self.update_waiting and self._inbound:
            events += self.receive(b"", now)
        return events

    def send_handshake(self, message: bytes) -> None:
        """Queue a post-handshake message under the current write keys (EKU)."""
        self._out.append(seal_inner(self.write.keys, message, ContentType.HANDSHAKE))

    def install(self, read_secret: bytes | None, write_secret: bytes | None) -> None:
        """Switch directions to new application traffic secrets, from sequence number 0."""
        if read_secret is not None:
            self.read = Direction(self.read.suite, read_secret)
        if write_secret is not None:
            self.write = Direction(self.write.suite, write_secret)

    def _abandon_update(self, failed: bool = True) -> None:
        # The keys of an unfinished update are counted as wasted; an ETSI 004 stream it held
        # is reclaimed by the KME when its TTL ends.
        if self.eku is not None:
            self.eku.abandon(failed)
