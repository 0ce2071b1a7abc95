"""Admission control at accept time (pure: time is passed in).

Before any TLS work or KME call, a new connection must fit: the tunnel's connection limit,
an optional per-source connection cap, a cap on handshakes in progress (per tunnel and per
source) and a per-source handshake rate. A source is an IPv4 address or an IPv6 /64
(:func:`~qkdproxy.core.ratelimit.source_key`). Handshakes, not established connections,
carry the per-source defaults: an authenticated client daemon legitimately multiplexes
many connections from one address, an unauthenticated one must not hold many slots.

:class:`HelloProgress` follows the first bytes of a server connection so the runtime can
give the ClientHello its own short deadlines without looking inside the TLS code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from qkdproxy.core.ratelimit import SourceBuckets

MAX_TRACKED_SOURCES = 4096
TLS_HANDSHAKE_RECORD = 0x16
# RFC 8446 5.1: a record carries at most 2^14 bytes (a little more is tolerated here: the
# TLS code gives the precise alert; this only decides when the hello is complete).
MAX_RECORD = (1 << 14) + 256


class Refusal(StrEnum):
    """Why a connection was refused or cut before its handshake could start."""

    CONNECTION_LIMIT = "connection_limit"
    SOURCE_CONNECTIONS = "source_connection_limit"
    HANDSHAKE_LIMIT = "handshake_limit"
    SOURCE_HANDSHAKES = "source_handshake_limit"
    SOURCE_RATE = "source_handshake_rate"
    FIRST_BYTE_TIMEOUT = "first_byte_timeout"
    HELLO_TIMEOUT = "hello_timeout"


@dataclass(frozen=True, slots=True)
class AdmissionLimits:
    """The limits of one tunnel (defaults: the tunnel keys in config.py); 0 turns one off."""

    max_connections: int
    max_connections_per_source: int
    max_handshakes: int
    max_handshakes_per_source: int
    handshake_rate_per_source: float
    handshake_burst_per_source: float


@dataclass(slots=True)
class Ticket:
    """One admitted connection; release its handshake slot, then the connection."""

    source: str
    handshaking: bool = True
    open: bool = True


@dataclass(slots=True)
class Admission:
    """Counts connections and handshakes per tunnel and per source, and decides."""

    limits: AdmissionLimits
    refused: dict[str, int] = field(default_factory=dict)
    _connections: dict[str, int] = field(default_factory=dict)
    _handshakes: dict[str, int] = field(default_factory=dict)
    _total: int = 0
    _handshaking: int = 0
    _rate: SourceBuckets | None = None

    def __post_init__(self) -> None:
        self._rate = self._buckets(self.limits)

    @staticmethod
    def _buckets(limits: AdmissionLimits) -> SourceBuckets | None:
        if limits.handshake_rate_per_source <= 0:
            return None
        burst = max(1.0, limits.handshake_burst_per_source)
        return SourceBuckets(limits.handshake_rate_per_source, burst, MAX_TRACKED_SOURCES)

    def update(self, limits: AdmissionLimits) -> None:
        """New limits (a reload); counts of live connections carry over."""
        if (limits.handshake_rate_per_source, limits.handshake_burst_per_source) != (
            self.limits.handshake_rate_per_source,
            self.limits.handshake_burst_per_source,
        ):
            self._rate = self._buckets(limits)
        self.limits = limits

    @property
    def connections(self) -> int:
        """Admitted connections still open."""
        return self._total

    @property
    def handshakes(self) -> int:
        """Admitted connections still handshaking."""
        return self._handshaking

    def admit(self, source: str, now: float, *, handshake: bool = True) -> Ticket | Refusal:
        """A ticket, or the first limit the connection would break (counted, nothing held).

        Checks run cheapest and broadest first; the rate bucket is spent only when every
        cap has room, so refused attempts do not also drain the source's rate budget.
        ``handshake`` False (a stream of a multiplexed tunnel) skips the handshake caps.
        """
        limits = self.limits
        refusal: Refusal | None = None
        if self._total >= limits.max_connections:
            refusal = Refusal.CONNECTION_LIMIT
        elif _full(self._connections.get(source, 0), limits.max_connections_per_source):
            refusal = Refusal.SOURCE_CONNECTIONS
        elif handshake:
            refusal = self._handshake_refusal(source, now)
        if refusal is not None:
            self.count(refusal)
            return refusal
        self._total += 1
        _add(self._connections, source, 1)
        ticket = Ticket(source)
        if handshake:
            self._handshaking += 1
            _add(self._handshakes, source, 1)
        else:
            ticket.handshaking = False
        return ticket

    def _handshake_refusal(self, source: str, now: float) -> Refusal | None:
        limits = self.limits
        if _full(self._handshaking, limits.max_handshakes):
            return Refusal.HANDSHAKE_LIMIT
        if _full(self._handshakes.get(source, 0), limits.max_handshakes_per_source):
            return Refusal.SOURCE_HANDSHAKES
        if self._rate is not None and not self._rate.take(source, now):
            return Refusal.SOURCE_RATE
        return None

    def count(self, refusal: Refusal) -> None:
        """Count a refusal decided elsewhere (a hello deadline)."""
        self.refused[refusal.value] = self.refused.get(refusal.value, 0) + 1

    def handshake_done(self, ticket: Ticket) -> None:
        """The handshake ended (either way): its slot is free. Idempotent."""
        if ticket.handshaking:
            ticket.handshaking = False
            self._handshaking -= 1
            _add(self._handshakes, ticket.source, -1)

    def release(self, ticket: Ticket) -> None:
        """The connection closed. Idempotent."""
        self.handshake_done(ticket)
        if ticket.open:
            ticket.open = False
            self._total -= 1
            _add(self._connections, ticket.source, -1)


def _full(count: int, limit: int) -> bool:
    return limit > 0 and count >= limit


def _add(table: dict[str, int], source: str, delta: int) -> None:
    # Entries exist only while the source has something open: bounded by max_connections.
    value = table.get(source, 0) + delta
    if value > 0:
        table[source] = value
    else:
        table.pop(source, None)


class HelloState(StrEnum):
    """How far the first handshake message of a connection has arrived."""

    NOTHING = "nothing"
    STARTED = "started"
    COMPLETE = "complete"


@dataclass(slots=True)
class HelloProgress:
    """Follows TLS records until the first handshake message (the ClientHello) is complete.

    It only measures arrival, never judges: anything that is not a handshake record, or a
    record too long to be one, counts as "complete" so that the TLS code, not a deadline,
    answers it with the right alert.
    """

    state: HelloState = HelloState.NOTHING
    _head: bytearray = field(default_factory=bytearray)
    _record_left: int = 0
    # The first handshake message: its 4-byte header, then only a count of its bytes.
    _message_head: bytearray = field(default_factory=bytearray)
    _message_bytes: int = 0

    def feed(self, data: bytes) -> HelloState:
        """Account ``data`` (the next bytes from the peer); return the new state."""
        if self.state is HelloState.COMPLETE or not data:
            return self.state
        self.state = HelloState.STARTED
        view = memoryview(data)
        while view and self.state is not HelloState.COMPLETE:
            if self._record_left == 0:
                view = self._record_header(view)
                continue
            take = min(self._record_left, len(view))
            if len(self._message_head) < 4:
                self._message_head += view[: min(take, 4 - len(self._message_head))]
            self._record_left -= take
            self._message_bytes += take
            view = view[take:]
            if len(self._message_head) == 4:
                needed = 4 + int.from_bytes(self._message_head[1:4], "big")
                if self._message_bytes >= needed:
                    self.state = HelloState.COMPLETE
        return self.state

    def _record_header(self, view: memoryview) -> memoryview:
        take = min(5 - len(self._head), len(view))
        self._head += view[:take]
        if len(self._head) == 5:
            length = int.from_bytes(self._head[3:5], "big")
            if self._head[0] != TLS_HANDSHAKE_RECORD or not 0 < length <= MAX_RECORD:
                self.state = HelloState.COMPLETE
            self._record_left, self._head = length, bytearray()
        return view[take:]
