"""The supply sizer's rate, target and refill levels against a plain model of their
definition (docs/PERFORMANCE.md, "Paced refills"; keys/supply.py): every take counted
afresh at each step, over demand shapes with bursts, idle spells longer than the window,
ageing out, round trips and KME request limits. The sizer keeps its takes for cheap
look-ups; its decisions must be the model's, step for step."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import pytest

from qkdproxy.keys.supply import (
    MAX_PACED_BATCH,
    MIN_REFILL_BATCH,
    PACE_WINDOW_S,
    REFILL_BATCH,
    REFILL_INTERVAL_S,
    RTT_WEIGHT,
    SHORT_WINDOW_MIN_TAKES,
    SHORT_WINDOW_S,
    RefillLevels,
    SupplySettings,
    SupplySizer,
)


@dataclass
class Model:
    """The sizer as its docstrings define it, with no state kept for speed."""

    settings: SupplySettings
    takes: list[float] = field(default_factory=list)
    rtt: float | None = None
    aged_out: bool = False

    def taken(self, now: float, seconds: float) -> int:
        # Time only moves on: a take that left the longest window never counts again.
        self.takes = [t for t in self.takes if now - self.settings.window_s <= t]
        return sum(1 for t in self.takes if now - min(seconds, self.settings.window_s) <= t)

    def rate(self, now: float) -> float:
        window = self.settings.window_s
        short = min(SHORT_WINDOW_S, window)
        recent = self.taken(now, short)
        long = self.taken(now, window) / window
        return max(long, recent / short if recent >= SHORT_WINDOW_MIN_TAKES else 0.0)

    def target(self, now: float) -> int:
        s, rate = self.settings, self.rate(now)
        if rate == 0:
            return 0 if self.aged_out else s.floor
        in_flight = math.ceil(rate * (self.rtt or 0.0) * s.margin)
        usable = max(1, math.floor(rate * s.max_age_s / 2))
        return max(1, min(s.ceiling, s.floor + in_flight, usable))

    def levels(self, now: float, max_request: int) -> RefillLevels:
        s = self.settings
        target = self.target(now)
        low = target - min(REFILL_BATCH, max(MIN_REFILL_BATCH, target // 2), target)
        pace = min(PACE_WINDOW_S, s.window_s)
        rate = max(self.rate(now), self.taken(now, pace) / pace)
        if rate == 0:
            return RefillLevels(low, target)
        paced = min(MAX_PACED_BATCH, max_request, math.ceil(rate * REFILL_INTERVAL_S))
        usable = max(1, math.floor(rate * s.max_age_s / 2))
        return RefillLevels(low, max(target, min(low + paced, s.ceiling, usable)))


SETTINGS = [
    SupplySettings(),
    SupplySettings(floor=0, ceiling=16, max_age_s=4.0, margin=2.0, window_s=1.0),
    SupplySettings(floor=2, ceiling=8, window_s=3.0),
    SupplySettings(floor=8, ceiling=256, max_age_s=30.0, margin=10.0, window_s=10.0),
]


def gaps(rng: random.Random) -> list[float]:
    """Times between takes: steady spells, bursts, and idle spells past every window."""
    out: list[float] = []
    for _ in range(60):
        shape = rng.choice(("steady", "burst", "idle", "sparse"))
        if shape == "steady":
            rate = rng.choice((2.0, 50.0, 400.0, 1500.0))
            out += [1 / rate] * rng.randint(5, 300)
        elif shape == "burst":
            out += [0.0] * rng.randint(1, 80)
        elif shape == "idle":
            out.append(rng.choice((1.0, 4.99, 5.0, 30.0, 61.0, 200.0)))
        else:
            out += [rng.uniform(0.2, 3.0) for _ in range(rng.randint(1, 10))]
    return out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("settings", SETTINGS)
def test_the_sizer_decides_as_the_model_at_every_take(settings: SupplySettings, seed: int) -> None:
    rng = random.Random(seed)
    sizer, model = SupplySizer(settings), Model(settings)
    now = 1000.0
    for step, gap in enumerate(gaps(rng)):
        now += gap
        sizer.took(now)
        model.takes.append(now)
        model.aged_out = False
        if step % 7 == 3:
            seconds = rng.choice((0.0005, 0.002, 0.02, 0.1, 0.5))
            sizer.round_trip(seconds)
            model.rtt = seconds if model.rtt is None else (
                RTT_WEIGHT * seconds + (1 - RTT_WEIGHT) * model.rtt
            )  # fmt: skip
        if step % 97 == 50:
            sizer.aged_out()
            model.aged_out = True
        # Asked again later too (a refill's end, a metrics scrape), with no take between.
        for later in (0.0, rng.choice((0.0, 0.3, 2.0, 70.0))):
            now += later
            cap = rng.choice((1, 5, 16, MAX_PACED_BATCH, 1000))
            levels = model.levels(now, cap)
            assert sizer.refill_levels(now, cap) == levels
            for held in (0, levels.low - 1, levels.low, levels.low + 1, levels.high):
                assert sizer.refills(now, held) == (levels.high > 0 and held <= levels.low)
            assert sizer.target(now) == model.target(now)
            assert sizer.rate(now) == model.rate(now)


def test_a_sizer_nobody_asks_keeps_only_about_a_window_of_takes() -> None:
    """The consumption gauge's sizer is asked for its rate only when /metrics is scraped: a
    daemon nobody scrapes must not keep every take it ever saw (at 500 takes a second that
    was over a gigabyte a day)."""
    settings = SupplySettings()
    sizer = SupplySizer(settings)
    per_s = 500
    seconds = 5 * settings.window_s
    for i in range(int(per_s * seconds)):
        sizer.took(i / per_s)
    in_window = per_s * settings.window_s
    assert len(sizer._takes) <= 2 * in_window + 1024
    # Forgetting early changes no answer: the rate is still the window's.
    assert sizer.rate(seconds) == pytest.approx(per_s, rel=0.01)
