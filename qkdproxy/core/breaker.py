"""A circuit breaker with exponential backoff for KME clients (pure: time is passed in).

After ``threshold`` consecutive failures the breaker opens: calls fail at once, without
touching the KME, until the backoff has passed; then one trial call is let through
(half-open). Success closes it; failure opens it again with a doubled backoff.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class BreakerState(StrEnum):
    """Where the breaker stands."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


@dataclass(slots=True)
class CircuitBreaker:
    """Counts consecutive failures and decides whether a call may go out."""

    threshold: int = 3
    base_backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    failures: int = 0
    state: BreakerState = BreakerState.CLOSED
    _open_until: float = 0.0
    _backoff_s: float = 0.0

    def allow(self, now: float) -> bool:
        """True if a call may be made now. When the backoff ends exactly one trial call is
        let through (HALF_OPEN); others wait for its outcome."""
        if self.state is BreakerState.OPEN and now >= self._open_until:
            self.state = BreakerState.HALF_OPEN
            return True
        return self.state is BreakerState.CLOSED

    def retry_after(self, now: float) -> float:
        """Seconds until the next trial call is allowed (0 if calls may go out)."""
        return max(0.0, self._open_until - now) if self.state is BreakerState.OPEN else 0.0

    def record_success(self) -> None:
        """A call worked: close the breaker and forget the backoff."""
        self.failures = 0
        self._backoff_s = 0.0
        self.state = BreakerState.CLOSED

    def record_failure(self, now: float) -> None:
        """A call failed because of the KME or the path to it."""
        self.failures += 1
        if self.state is BreakerState.HALF_OPEN or self.failures >= self.threshold:
            self._backoff_s = min(
                self.max_backoff_s, self._backoff_s * 2 if self._backoff_s else self.base_backoff_s
            )
            self._open_until = now + self._backoff_s
            self.state = BreakerState.OPEN
