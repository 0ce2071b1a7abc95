"""Seeded, scriptable fault injection for the KME simulator (pure: time in, decisions out).

A script is a JSON/TOML-shaped mapping, e.g.::

    {"seed": 7,
     "latency": {"fixed_ms": 100, "jitter_ms": 5},
     "error_bursts": [{"start_call": 10, "count": 3}],
     "reset_bursts": [{"start_call": 20, "count": 1}],
     "link_down": [{"start_s": 5, "end_s": 8}],
     "exhaust_at_s": [12]}

Calls are numbered per KME from 0; times are seconds since the simulator started.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class FaultScriptError(ValueError):
    """A fault script that does not parse; the message names the bad key."""


@dataclass(frozen=True, slots=True)
class Burst:
    """Calls ``start_call`` .. ``start_call + count - 1`` are hit."""

    start_call: int
    count: int

    def covers(self, call: int) -> bool:
        """True if call number ``call`` falls in this burst."""
        return self.start_call <= call < self.start_call + self.count


@dataclass(frozen=True, slots=True)
class Window:
    """A time window, seconds since start, end exclusive."""

    start_s: float
    end_s: float

    def covers(self, t: float) -> bool:
        """True if ``t`` falls in the window."""
        return self.start_s <= t < self.end_s


@dataclass(frozen=True, slots=True)
class FaultScript:
    """Everything that goes wrong, and when."""

    seed: int = 0
    fixed_ms: float = 0.0
    jitter_ms: float = 0.0
    error_bursts: tuple[Burst, ...] = ()
    reset_bursts: tuple[Burst, ...] = ()
    link_down: tuple[Window, ...] = ()
    exhaust_at_s: tuple[float, ...] = ()

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> FaultScript:
        """Parse and validate a script (see the module docstring)."""
        known = {"seed", "latency", "error_bursts", "reset_bursts", "link_down", "exhaust_at_s"}
        unknown = set(data) - known
        if unknown:
            raise FaultScriptError(f"unknown fault keys: {', '.join(sorted(unknown))}")
        latency = data.get("latency", {})
        try:
            script = cls(
                seed=int(data.get("seed", 0)),
                fixed_ms=float(latency.get("fixed_ms", 0.0)),
                jitter_ms=float(latency.get("jitter_ms", 0.0)),
                error_bursts=tuple(Burst(int(b["start_call"]), int(b["count"]))
                                   for b in data.get("error_bursts", [])),
                reset_bursts=tuple(Burst(int(b["start_call"]), int(b["count"]))
                                   for b in data.get("reset_bursts", [])),
                link_down=tuple(Window(float(w["start_s"]), float(w["end_s"]))
                                for w in data.get("link_down", [])),
                exhaust_at_s=tuple(float(t) for t in data.get("exhaust_at_s", [])),
            )  # fmt: skip
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise FaultScriptError(f"bad fault script: {exc!r}") from None
        if script.fixed_ms < 0 or script.jitter_ms < 0:
            raise FaultScriptError("latency must not be negative")
        return script


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with one call."""

    delay_s: float = 0.0
    fail: bool = False
    reset: bool = False


@dataclass(slots=True)
class FaultInjector:
    """Applies a script call by call; the same seed and calls give the same decisions."""

    script: FaultScript = field(default_factory=FaultScript)
    calls: int = 0
    _rng: random.Random = field(init=False, repr=False)
    _exhausted: set[float] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.script.seed)  # noqa: S311 - simulation, not secrets

    def decide(self) -> Decision:
        """The fate of the next call."""
        call = self.calls
        self.calls += 1
        jitter = self._rng.uniform(-1, 1) * self.script.jitter_ms if self.script.jitter_ms else 0.0
        delay = max(0.0, self.script.fixed_ms + jitter) / 1000
        return Decision(
            delay_s=delay,
            fail=any(b.covers(call) for b in self.script.error_bursts),
            reset=any(b.covers(call) for b in self.script.reset_bursts),
        )

    def link_up(self, elapsed_s: float) -> bool:
        """False inside a link-down window."""
        return not any(w.covers(elapsed_s) for w in self.script.link_down)

    def due_exhaustions(self, elapsed_s: float) -> int:
        """How many scheduled pool exhaustions became due since the last call."""
        due = {t for t in self.script.exhaust_at_s if t <= elapsed_s} - self._exhausted
        self._exhausted |= due
        return len(due)
