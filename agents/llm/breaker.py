"""A circuit breaker per deployment: closed → open after N consecutive failures → half-open after the
recovery timeout (one trial call at a time) → closed on a success, open again on a failure."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"


@dataclass
class CircuitBreaker:
    threshold: int = 5
    recovery: float = 30.0
    failures: int = 0
    opened_at: float | None = None
    trial_in_flight: bool = False

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return CLOSED
        if time.monotonic() - self.opened_at >= self.recovery:
            return HALF_OPEN
        return OPEN

    def allow(self) -> bool:
        """May a call go to this deployment now? In half-open, only one trial call at a time."""
        state = self.state
        if state == CLOSED:
            return True
        if state == HALF_OPEN and not self.trial_in_flight:
            self.trial_in_flight = True
            return True
        return False

    def available(self) -> bool:
        """Like allow() but without taking the half-open trial slot (for filtering candidates)."""
        state = self.state
        return state == CLOSED or (state == HALF_OPEN and not self.trial_in_flight)

    def success(self) -> None:
        self.failures = 0
        self.opened_at = None
        self.trial_in_flight = False

    def failure(self) -> None:
        self.trial_in_flight = False
        if self.opened_at is not None:  # a failed trial (or a late failure) re-opens for a full pause
            self.opened_at = time.monotonic()
            return
        self.failures += 1
        if self.failures >= self.threshold:
            self.opened_at = time.monotonic()

    def release_trial(self) -> None:
        """A trial that ended without a verdict (client error, cancellation) frees the slot."""
        self.trial_in_flight = False


_breakers: dict[int, CircuitBreaker] = {}
_lock = threading.Lock()


def get(deployment_id: int, *, threshold: int = 5, recovery: float = 30.0) -> CircuitBreaker:
    breaker = _breakers.get(deployment_id)
    if breaker is None:
        with _lock:
            breaker = _breakers.setdefault(deployment_id, CircuitBreaker(threshold=threshold, recovery=recovery))
    # Settings edited in the admin apply from the next call.
    breaker.threshold, breaker.recovery = threshold, recovery
    return breaker


def state_of(deployment_id: int) -> str:
    breaker = _breakers.get(deployment_id)
    return breaker.state if breaker else CLOSED


def reset() -> None:
    with _lock:
        _breakers.clear()
