"""What a server may spend on a peer it has not authenticated yet (pure: time is passed in).

A server learns who its client is only after the client's Finished, but it must pick its QKD
key while answering the ClientHello. In the server-initiated flow that means taking a fresh
key from its own KME for whoever asks; in the client-initiated flow it means a ``dec_keys``
call for whatever id the hello names. :class:`SpendGate` decides, before any KME call,
whether this hello may cost that: the flow must be served by the tunnel, and the source
address (an IPv6 /64 counts as one source) and the KME link as a whole must have budget left.

The source of the hello being answered is read from ``qkd.responder.HELLO_SOURCE``, which
the tunnel sets in the task that serves each accepted connection until the peer is
authenticated.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

from qkdproxy.core.keys import KeyNotFoundError, QkdKey
from qkdproxy.core.ratelimit import SourceBuckets, TokenBucket
from qkdproxy.keys.announce import is_announcement_sink
from qkdproxy.keys.responder import HELLO_SOURCE
from qkdproxy.keys.sources import SlaveKeySource

SERVER_INITIATED = "server-initiated"
CLIENT_INITIATED = "client-initiated"


@dataclass(frozen=True, slots=True)
class Budget:
    """A token-bucket budget: ``rate`` per second, ``burst`` saved up."""

    rate: float
    burst: float


@dataclass(frozen=True, slots=True)
class PreAuthSettings:
    """A server tunnel's pre-authentication spending rules (see docs/CONFIGURATION.md)."""

    flows: frozenset[str] = frozenset({CLIENT_INITIATED})
    # Fresh keys handed to one source in the server-initiated flow.
    per_source: Budget = Budget(1.0, 10.0)
    # Key ids one source named that the KME did not know (each cost a dec_keys call).
    unknown_ids: Budget = Budget(1.0, 10.0)


@dataclass(slots=True)
class GateCounters:
    """Hellos refused before any KME call, by reason (a small fixed set)."""

    refused: dict[str, int] = field(default_factory=dict)

    def count(self, reason: str) -> None:
        """One more refusal for ``reason``."""
        self.refused[reason] = self.refused.get(reason, 0) + 1


class SpendGate:
    """The server's answer to "may this hello cost a KME call?" for one tunnel.

    ``link`` is the pre-authentication budget of the whole KME link, shared by every server
    tunnel that draws from the same KME section.
    """

    def __init__(
        self,
        settings: PreAuthSettings,
        link: TokenBucket,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self._link = link
        self._clock = clock
        self._fresh = SourceBuckets(settings.per_source.rate, settings.per_source.burst)
        self._unknown = SourceBuckets(settings.unknown_ids.rate, settings.unknown_ids.burst)
        self.counters = GateCounters()

    @property
    def flows(self) -> Collection[str]:
        """The flows this tunnel serves."""
        return self.settings.flows

    def admit(self, flow: str) -> str | None:
        """None if a hello of ``flow`` from the current source may cost a KME call now;
        otherwise why not (safe to log). A server-initiated admission spends budget."""
        now = self._clock()
        source = HELLO_SOURCE.get() or "unknown"
        if flow not in self.settings.flows:
            return self._refuse("flow_off", f"the {flow} QKD flow is off on this tunnel")
        if flow == CLIENT_INITIATED:
            # Only ids the KME did not know are charged (see note_unknown_id); a source that
            # named too many of them recently gets no further dec_keys call.
            if self._unknown.peek(source, now) < 1:
                return self._refuse("unknown_ids", "too many unknown key ids from this source")
            return None
        if not self._fresh.take(source, now):
            return self._refuse("source_budget", "pre-auth key budget of this source spent")
        if not self._link.take(now):
            return self._refuse("link_budget", "pre-auth key budget of the KME link spent")
        return None

    def note_unknown_id(self) -> None:
        """The KME did not know an id the current source named: charge that source."""
        self._unknown.take(HELLO_SOURCE.get() or "unknown", self._clock())

    def _refuse(self, reason: str, text: str) -> str:
        self.counters.count(reason)
        return text


class GatedSlave:
    """A slave source that charges the gate's unknown-id budget for every id its KME (or
    the announced-key cache in front of it) did not know."""

    def __init__(self, inner: SlaveKeySource, gate: SpendGate) -> None:
        self._inner = inner
        self._gate = gate

    async def get_key(self, key_id: bytes) -> QkdKey:
        """The key for ``key_id`` from ``inner``; an unknown id is charged to the source."""
        try:
            return await self._inner.get_key(key_id)
        except KeyNotFoundError:
            self._gate.note_unknown_id()
            raise

    def announced(self, key_ids: Sequence[bytes]) -> None:
        """Ids the authenticated peer announced (inside the tunnel): to the inner cache."""
        if is_announcement_sink(self._inner):
            self._inner.announced(key_ids)
