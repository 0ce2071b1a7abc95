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
    def from_mapping(cls, data: Any) -> FaultScript:
        """Parse and validate a script (see the module docstring)."""
        if not isinstance(data, Mapping):
            raise FaultScriptError("a fault script is a JSON object")
        known = {"seed", "latency", "error_bursts", "reset_bursts", "link_down", "exhaust_at_s"}
        unknown = set(data) - known
        if unknown:
            raise FaultScriptError(f"unknown fault keys: {', '.join(sorted(unknown))}")
        latency = data.get("latency", {})
        if not isinstance(latency, Mapping):
            raise FaultScriptError("latency must be an object")
        script = cls(
            seed=int(_number(data, "seed", 0, whole=True)),
            fixed_ms=_number(latency, "fixed_ms", 0.0),
            jitter_ms=_number(latency, "jitter_ms", 0.0),
            error_bursts=_bursts(data, "error_bursts"),
            reset_bursts=_bursts(data, "reset_bursts"),
            link_down=tuple(
                Window(_number(w, "start_s"), _number(w, "end_s"))
                for w in _objects(data, "link_down")
            ),
            exhaust_at_s=tuple(_number({"exhaust_at_s": t}, "exhaust_at_s")
                               for t in _list(data, "exhaust_at_s")),
        )  # fmt: skip
        if script.fixed_ms < 0 or script.jitter_ms < 0:
            raise FaultScriptError("latency must not be negative")
        return script


def _number(
    data: Mapping[str, Any], key: str, default: float | None = None, whole: bool = False
) -> float:
    value = data.get(key, default)
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        raise FaultScriptError(f"{key} must be a number")
    if whole and not float(value).is_integer():
        raise FaultScriptError(f"{key} must be a whole number")
    return float(value)


def _list(data: Mapping[str, Any], key: str) -> list[Any]:
    value = data.get(key, [])
    if not isinstance(value, list):
        raise FaultScriptError(f"{key} must be a list")
    return value


def _objects(data: Mapping[str, Any], key: str) -> list[Mapping[str, Any]]:
    items = _list(data, key)
    if not all(isinstance(item, Mapping) for item in items):
        raise FaultScriptError(f"{key} entries must be objects")
    return items


def _bursts(data: Mapping[str, Any], key: str) -> tuple[Burst, ...]:
    return tuple(
        Burst(int(_number(b, "start_call", whole=True)), int(_number(b, "count", whole=True)))
        for b in _objects(data, key)
    )


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
