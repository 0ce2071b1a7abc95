"""At most one log line per interval per reason (pure: time is passed in).

A flood of refused connections must not become a flood of log lines: the first event of a
reason is logged at once, later ones within ``interval_s`` are only counted, and the next
line carries how many were suppressed since the previous one.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class _Reason:
    last_logged: float
    suppressed: int = 0


@dataclass(slots=True)
class LogThrottle:
    """Decides whether an event of a given reason should produce a log line now."""

    interval_s: float = 10.0
    _reasons: dict[str, _Reason] = field(default_factory=dict)

    def admit(self, reason: str, now: float) -> int | None:
        """None if the event should only be counted; otherwise the number of events of this
        reason suppressed since the last line (0 for the first), to be logged with it."""
        state = self._reasons.get(reason)
        if state is None:
            self._reasons[reason] = _Reason(now)
            return 0
        if now - state.last_logged < self.interval_s:
            state.suppressed += 1
            return None
        suppressed, state.suppressed, state.last_logged = state.suppressed, 0, now
        return suppressed
