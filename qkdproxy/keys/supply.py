"""How many QKD keys (or ETSI 004 streams) to hold ahead of use (pure: time is passed in).

Little's law: the keys taken while one refill is on its way to the KME and back are
``take rate x round trip``. The supply holds that many (times a margin) on top of a small
floor, so a handshake finds its key in memory; it holds no more than the demand can use
before the keys age out, so a sparse tunnel does not draw keys only to expire them; and it
refills only when a key is taken, so an idle tunnel costs at most what it already holds.

An ETSI 014 supply refills in batches (:meth:`SupplySizer.refill`): it waits until it is a
batch below its target, so one ``enc_keys`` call, and the peer's ``dec_keys`` for the
announced ids, carries several keys. Under sustained demand the batch is what the demand
takes in ``batch_window_s``, held on top of the supply's usual low point; the supply then
holds that many keys more, each waiting that much longer.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from dataclasses import dataclass

# Round-trip smoothing: recent calls dominate, one slow call does not.
RTT_WEIGHT = 0.3
# A rise in demand shows over this short window long before it does over the full one; a
# take or two there is no trend yet (sparse demand would look like a burst).
SHORT_WINDOW_S = 5.0
SHORT_WINDOW_MIN_TAKES = 3
# Small batches: at most SMALL_BATCH keys and half the target (two keys for targets of 2 to
# 5, the whole target below that): from a target of 4 up the supply never runs below half
# of what the sizer asks, which covers three times the keys taken during a refill's round
# trip (margin 6). A KME round trip costs both daemons about as much CPU as a sixth of a
# handshake (docs/PERFORMANCE.md).
SMALL_BATCH = 8
MIN_BATCH = 2
# Batches grown with the demand: the take rate over the last second (a burst of a few
# connections after a quiet spell is not yet a demand to draw ahead for), and at most the
# ids one KEY_IDS announcement names and the peer fetches with one dec_keys.
BATCH_RATE_WINDOW_S = 1.0
MAX_BATCH = 64


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
    # An ETSI 014 refill carries the keys the demand takes in this long, once that is more
    # than a small batch (0: small batches only).
    batch_window_s: float = 0.1

    def __post_init__(self) -> None:
        if not 0 <= self.floor <= self.ceiling or self.ceiling < 1:
            raise ValueError("need 0 <= floor <= ceiling and ceiling >= 1")
        if self.max_age_s <= 0 or self.margin < 1 or self.window_s <= 0:
            raise ValueError("need max_age_s > 0, margin >= 1 and window_s > 0")
        if self.batch_window_s < 0:
            raise ValueError("need batch_window_s >= 0")


@dataclass(frozen=True, slots=True)
class Refill:
    """When and how far to refill: hold ``target`` keys, refill once ``batch`` are missing."""

    target: int
    batch: int


class SupplySizer:
    """Measures take rate and KME round trip; says how many keys to hold."""

    def __init__(self, settings: SupplySettings) -> None:
        self.settings = settings
        self._takes: deque[float] = deque()
        self._rtt: float | None = None
        self._aged_out = False

    def took(self, now: float) -> None:
        """A key (or stream) was handed to a handshake."""
        self._takes.append(now)
        self._aged_out = False

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
        window = self.settings.window_s
        while self._takes and self._takes[0] < now - window:
            self._takes.popleft()
        short = min(SHORT_WINDOW_S, window)
        recent = len(self._takes) - bisect.bisect_left(self._takes, now - short)
        if recent < SHORT_WINDOW_MIN_TAKES:
            recent = 0
        return max(len(self._takes) / window, recent / short)

    def target(self, now: float) -> int:
        """Keys to hold now: the floor when idle (nothing once the floor aged out), else the
        demand over a round trip (with margin) on top of the floor, capped by what the demand
        uses within half the maximum key age, and by the ceiling."""
        return self._target(self.rate(now))

    def _target(self, rate: float) -> int:
        s = self.settings
        if rate == 0:
            return 0 if self._aged_out else s.floor
        in_flight = math.ceil(rate * self.rtt_s * s.margin)
        return max(1, min(self._cap(rate), s.floor + in_flight))

    def _cap(self, rate: float) -> int:
        # What the demand uses within half the maximum key age, and the ceiling.
        s = self.settings
        return min(s.ceiling, max(1, math.floor(rate * s.max_age_s / 2)))

    def refill(self, now: float, per_request: int) -> Refill:
        """The target and batch of a supply refilled in batches of up to ``per_request``
        keys (the KME's ``max_key_per_request``).

        The low point, where a refill starts, is the target less a small batch
        (:func:`small_batch`). Once the demand of the last second takes more than a small
        batch in ``batch_window_s``, the batch is that many keys (at most ``MAX_BATCH`` and
        ``per_request``), held on top of the same low point and within the same caps: the
        supply holds at most the keys the demand takes in ``batch_window_s`` more than a
        small batch would, so a key waits at most that much longer, and a stop leaves at
        most that many more to expire or strand.
        """
        rate = self.rate(now)
        base = self._target(rate)
        small = small_batch(base)
        s = self.settings
        recent = len(self._takes) - bisect.bisect_right(self._takes, now - BATCH_RATE_WINDOW_S)
        demand = recent / min(BATCH_RATE_WINDOW_S, s.window_s)
        grown = min(MAX_BATCH, per_request, math.ceil(demand * s.batch_window_s))
        if grown <= small:
            return Refill(base, small)
        low = base - small
        target = max(base, min(self._cap(rate), low + grown))
        return Refill(target, target - low)


def small_batch(target: int) -> int:
    """How many keys below ``target`` a supply may fall before it refills at low rates (see
    ``SMALL_BATCH``): at least one, at most half the target once that is two or more."""
    return min(SMALL_BATCH, max(MIN_BATCH, target // 2), target)
