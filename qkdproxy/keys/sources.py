"""The asynchronous key-source interfaces the handshake engine consumes.

"Master" is the side that originates key ids (ETSI 014 ``enc_keys``), whatever its TLS role;
"slave" fetches the key for an id it was given (ETSI 014 ``dec_keys``); a stream source is
the stateful ETSI 004 application interface.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, TypeGuard, runtime_checkable

from qkdproxy.core.keys import QkdKey

# A source that holds keys or streams ahead of use drops them at most this often when the
# peer refuses one (FlushableSource.flush_after_refusal).
FLUSH_INTERVAL_S = 10.0
# ... and only after this many refusals in a row: a refusal is an unauthenticated alert, so
# one of them must cost at most the key it named, never the whole supply.
REFUSALS_BEFORE_FLUSH = 3


@dataclass(slots=True)
class RefusalStreak:
    """Decides when refusals by the peer justify dropping everything held ahead (pure)."""

    threshold: int = REFUSALS_BEFORE_FLUSH
    interval_s: float = FLUSH_INTERVAL_S
    count: int = 0
    last_flush: float = -math.inf

    def refused(self, now: float) -> bool:
        """One more refusal in a row; True if the held supply should be dropped now."""
        self.count += 1
        if self.count < self.threshold or now - self.last_flush < self.interval_s:
            return False
        self.count, self.last_flush = 0, now
        return True

    def accepted(self) -> None:
        """A handshake with a key of this supply completed: the streak is broken."""
        self.count = 0


class MasterKeySource(Protocol):
    """Takes a fresh key and its id from the local KME (ETSI 014 ``enc_keys``)."""

    async def take_key(self) -> QkdKey:
        """A key nobody has used; the KME now holds it for the peer."""
        ...


@runtime_checkable
class FlushableSource(Protocol):
    """A source of keys (or streams) held ahead of use, which can drop them when the peer
    refuses one: the peer or a KME lost them (see ``flush_after_refusal``)."""

    buffer_epoch: int
    # Names of the TLS alerts with which a peer refuses a key or stream of this source.
    refusal_alerts: frozenset[str]

    def flush_after_refusal(self) -> bool:
        """Count a refusal; drop what is held ahead after several in a row (rate limited).
        True if that happened now."""
        ...

    def note_accepted(self) -> None:
        """A handshake that used a key (or stream) of this source completed."""
        ...


_CONFORMING: dict[tuple[type, type], bool] = {}


def conforms(value: object, protocol: type) -> bool:
    """``isinstance(value, protocol)`` for a runtime-checkable Protocol, decided once per
    class: Python 3.11 re-derives a protocol's members on every such check (about 10 us),
    and the key path asks several times per connection. Sources define their protocol
    members in their class or ``__init__``, so every instance of a class answers alike."""
    key = (type(value), protocol)
    found = _CONFORMING.get(key)
    if found is None:
        found = _CONFORMING[key] = isinstance(value, protocol)
    return found


def is_flushable(source: object) -> TypeGuard[FlushableSource]:
    """``source`` holds keys or streams ahead of use (:class:`FlushableSource`)."""
    return conforms(source, FlushableSource)


class SlaveKeySource(Protocol):
    """Fetches the key the peer's master took (ETSI 014 ``dec_keys``)."""

    async def get_key(self, key_id: bytes) -> QkdKey:
        """The key for ``key_id``; KeyNotFoundError if unknown or already used."""
        ...


class StreamKeySource(Protocol):
    """ETSI GS QKD 004 OPEN_CONNECT / GET_KEY / CLOSE."""

    async def open(self, ksid: bytes | None) -> bytes:
        """Open a key stream; ``None`` asks the KME to assign the id. Returns the KSID."""
        ...

    async def get_key(self, ksid: bytes, index: int) -> bytes:
        """The 32-byte key at ``index`` of the stream (same bytes at both ends)."""
        ...

    async def close(self, ksid: bytes) -> None:
        """Close the stream; no new keys are allocated for it afterwards."""
        ...


class KmeCallObserver(Protocol):
    """Told about every KME call: its name, duration, and error class (None if it worked).

    Error classes are a small fixed set: not_found, exhausted, http_4xx, http_5xx, timeout,
    tls, connect, protocol, refused, unavailable.
    """

    def __call__(self, call: str, seconds: float, error: str | None) -> None: ...


def no_observer(call: str, seconds: float, error: str | None) -> None:
    """The default observer: does nothing."""


@dataclass(frozen=True, slots=True)
class KeySources:
    """The key sources an endpoint has; a flow that needs a missing one fails closed."""

    master: MasterKeySource | None = None
    slave: SlaveKeySource | None = None
    stream: StreamKeySource | None = None
