"""How many QKD keys (or ETSI 004 streams) to hold ahead of use (pure: time is passed in).

Little's law: the keys taken while one refill is on its way to the KME and back are
``take rate x round trip``. The supply holds that many (times a margin) on top of a small
floor, so a handshake finds its key in memory; it holds no more than the demand can use
before the keys age out, so a sparse tunnel does not draw keys only to expire them; and it
refills only when a key is taken, so an idle tunnel costs at most what it already holds.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import NamedTuple

# Round-trip smoothing: recent calls dominate, one slow call does not.
RTT_WEIGHT = 0.3
# A rise in demand shows over this short window long before it does over the full one; a
# take or two there is no trend yet (sparse demand would look like a burst).
SHORT_WINDOW_S = 5.0
SHORT_WINDOW_MIN_TAKES = 3
# A refill is a KME round trip that costs each daemon and the KME about half a millisecond
# of CPU (docs/PERFORMANCE.md, "Paced refills"): under heavy demand a refill carries the
# keys taken over this interval, so the KME is called at most about this often per supply
# whatever the connection rate. The supply holds that many keys more at such rates (a
# twentieth of a second's demand), which an idle spell after a burst may leave to expire.
REFILL_INTERVAL_S = 0.05
# ... and never more than this per refill on that account (a KME's own per-request limit
# applies on top).
MAX_PACED_BATCH = 64
PACE_WINDOW_S = 1.0
# Takes that left the window are dropped from the sizer's list once this many have gathered
# (and they are more than half of it): rarely, and then in one move.
DROP_AT = 256
# Every this many takes, a take itself forgets those older than the window.
TRIM_EVERY = 1024


@dataclass(frozen=True, slots=True)
class SupplySettings:
    """Bounds of a demand-sized supply (see docs/CONFIGURATION.md, ``[kme]``)."""

    floor: int = 4
    ceiling: int = 128
    max_age_s: float = 120.0
    # Our refill's round trip, the announcement riding on a later handshake, the peer's
    # fetch of the announced ids, and the handshakes in flight meanwhile: measured, 3 left
    # half the handshakes at 100 ms KME latency waiting on a fetch, 6 left a few percent.
    margin: float = 6.0
    # Take rate measured over this window.
    window_s: float = 60.0

    def __post_init__(self) -> None:
        if not 0 <= self.floor <= self.ceiling or self.ceiling < 1:
            raise ValueError("need 0 <= floor <= ceiling and ceiling >= 1")
        if self.max_age_s <= 0 or self.margin < 1 or self.window_s <= 0:
            raise ValueError("need max_age_s > 0, margin >= 1 and window_s > 0")


class SupplySizer:
    """Measures take rate and KME round trip; says how many keys to hold."""

    def __init__(self, settings: SupplySettings) -> None:
        self.settings = settings
        # Take times, oldest first, in a list (bisected: a deque's middle is slow to reach);
        # those before ``_first`` left the window and are dropped in bulk now and then.
        self._takes: list[float] = []
        self._first = 0
        self._short = min(SHORT_WINDOW_S, settings.window_s)
        self._pace = min(PACE_WINDOW_S, settings.window_s)
        self._rtt: float | None = None
        self._aged_out = False

    def took(self, now: float) -> None:
        """A key (or stream) was handed to a handshake."""
        takes = self._takes
        takes.append(now)
        self._aged_out = False
        # Takes leave the window only when something asks for the rate; a sizer nobody
        # asks (the consumption gauge of a daemon nobody scrapes) must still stay bounded.
        if not len(takes) % TRIM_EVERY:
            self._in_window(now)

    def aged_out(self) -> None:
        """Held keys grew too old unused: until the next take, hold nothing new (an idle
        tunnel must not draw a fresh floor every ``max_age_s``)."""
        self._aged_out = True

    def round_trip(self, seconds: float) -> None:
        """A refill call to the KME took ``seconds``."""
        self._rtt = seconds if self._rtt is None else (
            RTT_WEIGHT * seconds + (1 - RTT_WEIGHT) * self._rtt
        )  # fmt: skip

    @property
    def rtt_s(self) -> float:
        """The smoothed KME round trip (0 before the first call)."""
        return self._rtt or 0.0

    def rate(self, now: float) -> float:
        """Keys taken per second: the higher of the rates over the last few seconds and over
        the measuring window (growth is seen at once, sparse demand is not forgotten)."""
        return self._rate(now, self._in_window(now))

    def _in_window(self, now: float) -> int:
        """Forget the takes older than the window; where the rest start in ``_takes``."""
        takes, first = self._takes, self._first
        horizon = now - self.settings.window_s
        end = len(takes)
        while first < end and takes[first] < horizon:
            first += 1
        if first > DROP_AT and 2 * first > end:
            del takes[:first]
            first = 0
        self._first = first
        return first

    def _rate(self, now: float, first: int) -> float:
        takes = self._takes
        short = self._short
        recent = len(takes) - bisect.bisect_left(takes, now - short, first)
        if recent < SHORT_WINDOW_MIN_TAKES:
            recent = 0
        return max((len(takes) - first) / self.settings.window_s, recent / short)

    def target(self, now: float) -> int:
        """Keys to hold now: the floor when idle (nothing once the floor aged out), else the
        demand over a round trip (with margin) on top of the floor, capped by what the demand
        uses within half the maximum key age, and by the ceiling."""
        return self._target(self.rate(now))

    def _target(self, rate: float) -> int:
        s = self.settings
        if rate == 0:
            return 0 if self._aged_out else s.floor
        in_flight = math.ceil(rate * (self._rtt or 0.0) * s.margin)
        return max(1, min(s.ceiling, s.floor + in_flight, self._usable(rate)))

    def _usable(self, rate: float) -> int:
        return max(1, math.floor(rate * self.settings.max_age_s / 2))

    def refills(self, now: float, held: int) -> bool:
        """Whether a supply holding ``held`` keys refills now: ``held`` is at most the low
        level of :meth:`refill_levels` and the high one is above 0. Both follow from the
        target alone (the high level is 0 exactly when the target is: with no take in the
        window none is in the last second either), so the pacing is not worked out."""
        target = self._target(self._rate(now, self._in_window(now)))
        return target > 0 and held <= target - refill_batch(target)

    def refill_levels(self, now: float, max_request: int = MAX_PACED_BATCH) -> RefillLevels:
        """When a supply of whole keys refills and up to what: it falls at most a batch
        (:func:`refill_batch`) below :meth:`target` before a refill; under heavy demand it
        then fills above the target by what the demand takes over ``REFILL_INTERVAL_S``, so
        refills (KME round trips) come no more often than that. Never above the ceiling or
        what the demand uses within half the maximum key age.

        ``max_request``: the most keys one KME call carries (its ``max_key_per_request``).
        A paced batch above it would take several calls all the same, as many per key as
        batches of ``max_request``: it would only hold more keys, so it is capped there.
        """
        first = self._in_window(now)
        rate = self._rate(now, first)
        target = self._target(rate)
        low = target - refill_batch(target)
        # The demand of the last second: the sizer's rate takes seconds to see a rise, and
        # overrating a burst here costs only a refill's worth of keys held.
        takes, pace = self._takes, self._pace
        rate = max(rate, (len(takes) - bisect.bisect_left(takes, now - pace, first)) / pace)
        if not rate:
            return RefillLevels(low, target)
        paced = min(MAX_PACED_BATCH, max_request, math.ceil(rate * REFILL_INTERVAL_S))
        high = min(low + paced, self.settings.ceiling, self._usable(rate))
        return RefillLevels(low, max(target, high))


class RefillLevels(NamedTuple):
    """A supply refills once it holds ``low`` keys or fewer, up to ``high``."""

    low: int
    high: int


# Refills below the target come in batches: each enc_keys call, and the peer's dec_keys for
# the announced ids, carries several keys. The batch is at most REFILL_BATCH and half the
# target (two keys for targets of 2 to 5, the whole target below that): from a target of 4 up
# the supply never runs below half of what the sizer asks, which covers three times the keys
# taken during a refill's round trip (margin 6). Under heavy demand the paced batch above is
# larger.
REFILL_BATCH = 8
MIN_REFILL_BATCH = 2


def refill_batch(target: int) -> int:
    """How many keys below ``target`` a supply may fall before it refills (see
    ``REFILL_BATCH``): at least one, at most half the target once that is two or more."""
    return min(REFILL_BATCH, max(MIN_REFILL_BATCH, target // 2), target)
