"""Deployment health from live traffic (the last N calls: error rate, latency) and the periodic probe.

healthy: few errors and normal latency; degraded: error rate over LLM_DEGRADED_ERROR_RATE or median
latency over LLM_SLOW_LATENCY_MS, or the probe said so; unhealthy: error rate over
LLM_UNHEALTHY_ERROR_RATE, an open breaker, or a failed probe. Unhealthy deployments are skipped while
another one can serve.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from django.conf import settings

from agents.llm import breaker

HEALTHY = "healthy"
DEGRADED = "degraded"
UNHEALTHY = "unhealthy"
UNKNOWN = "unknown"
MIN_SAMPLES = 4  # below this, error rates say nothing yet
RETRY_UNHEALTHY_AFTER = 30.0  # seconds without traffic after which an unhealthy deployment gets tried again


@dataclass
class Window:
    calls: deque[tuple[bool, int]] = field(default_factory=lambda: deque(maxlen=settings.LLM_HEALTH_WINDOW))
    last_error: str = ""
    last_at: float | None = None  # wall clock of the last call

    def record(self, ok: bool, latency_ms: int, error: str = "") -> None:
        self.calls.append((ok, latency_ms))
        self.last_at = time.time()
        if not ok:
            self.last_error = error

    @property
    def error_rate(self) -> float:
        if not self.calls:
            return 0.0
        return sum(1 for ok, _ in self.calls if not ok) / len(self.calls)

    @property
    def latency_ms(self) -> int | None:
        latencies = [ms for ok, ms in self.calls if ok]
        return int(statistics.median(latencies)) if latencies else None


_windows: dict[int, Window] = {}
_lock = threading.Lock()


def record(deployment_id: int, ok: bool, latency_ms: int, error: str = "") -> None:
    window = _windows.get(deployment_id)
    if window is None:
        with _lock:
            window = _windows.setdefault(deployment_id, Window())
    window.record(ok, latency_ms, error)


def window(deployment_id: int) -> Window | None:
    return _windows.get(deployment_id)


def status(deployment_id: int, probe_status: str = UNKNOWN) -> str:
    if breaker.state_of(deployment_id) == breaker.OPEN:
        return UNHEALTHY
    w = _windows.get(deployment_id)
    live = UNKNOWN
    if w is not None and len(w.calls) >= MIN_SAMPLES:
        rate = w.error_rate
        if rate >= settings.LLM_UNHEALTHY_ERROR_RATE:
            # Give it another chance after a quiet spell, and keep it in rotation once a call succeeds again.
            stale = w.last_at is not None and time.time() - w.last_at > RETRY_UNHEALTHY_AFTER
            live = DEGRADED if stale or w.calls[-1][0] else UNHEALTHY
        elif rate >= settings.LLM_DEGRADED_ERROR_RATE or (w.latency_ms or 0) > settings.LLM_SLOW_LATENCY_MS:
            live = DEGRADED
        else:
            live = HEALTHY
    elif w is not None and w.calls:
        live = HEALTHY if w.calls[-1][0] else DEGRADED
    # Live traffic is fresher than the probe; the probe speaks for idle deployments.
    if live != UNKNOWN:
        return live
    return probe_status if probe_status in (HEALTHY, DEGRADED, UNHEALTHY) else UNKNOWN


def reset() -> None:
    with _lock:
        _windows.clear()
