"""Retry policy: which errors are retried and how long to wait (exponential backoff, full jitter)."""

from __future__ import annotations

import random

from django.conf import settings

from agents.llm.types import LLMError


def is_retryable(error: BaseException) -> bool:
    """Connection errors, timeouts, 429 and 5xx are; 4xx client errors never are."""
    return isinstance(error, LLMError) and bool(error.retryable)


def backoff_delay(retry_number: int, *, retry_after: float | None = None, base: float | None = None,
                  max_delay: float | None = None) -> float:
    """Seconds to wait before retry `retry_number` (1 = first retry): uniform(0, base * 2**(n-1)), capped.

    An upstream's Retry-After wins when it asks for longer, still capped at max_delay.
    """
    base = settings.LLM_RETRY_BASE_DELAY if base is None else base
    max_delay = settings.LLM_RETRY_MAX_DELAY if max_delay is None else max_delay
    ceiling = min(max_delay, base * (2 ** max(0, retry_number - 1)))
    delay = random.uniform(0, ceiling)
    if retry_after is not None and retry_after > delay:
        delay = retry_after
    return max(0.0, min(delay, max_delay))
