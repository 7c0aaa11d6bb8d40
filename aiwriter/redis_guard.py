"""Skip Redis for a few seconds after it fails, so an outage costs one timeout, not one per call.

Rate limits then fall back to process-local counters and the response cache to its memory tier.
"""

from __future__ import annotations

import logging
import time

logger = logging.getLogger(__name__)

PAUSE_SECONDS = 5.0
_down_until = 0.0


def available() -> bool:
    return time.monotonic() >= _down_until


def failed(what: str, exc: BaseException) -> None:
    """Records a Redis failure; logs once per pause, not once per call."""
    global _down_until
    if available():
        logger.warning("Redis unavailable for %s (%s); using process-local fallbacks for %ss",
                       what, exc.__class__.__name__, PAUSE_SECONDS)
    _down_until = time.monotonic() + PAUSE_SECONDS


def reset() -> None:
    global _down_until
    _down_until = 0.0
