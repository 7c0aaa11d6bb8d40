"""Retry policy: exponential backoff with full jitter, capped; Retry-After honoured up to the cap; 4xx never."""

import random

from agents.llm import retry
from agents.llm.types import BadUpstreamRequest, LLMError, RateLimited, UpstreamTimeout


def test_backoff_grows_exponentially_with_jitter_and_is_capped():
    random.seed(7)
    for n, ceiling in ((1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (8, 1.0), (30, 1.0)):
        delays = [retry.backoff_delay(n, base=0.1, max_delay=1.0) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays), (n, max(delays))
        assert len(set(delays)) > 100  # jittered, not one fixed pause
        assert max(delays) > ceiling * 0.8  # and it does use the whole range


def test_retry_after_wins_when_longer_but_stays_under_the_cap():
    assert retry.backoff_delay(1, retry_after=0.5, base=0.01, max_delay=2.0) == 0.5
    assert retry.backoff_delay(1, retry_after=30, base=0.01, max_delay=2.0) == 2.0


def test_which_errors_are_retried():
    assert retry.is_retryable(LLMError("5xx", code="upstream_error"))
    assert retry.is_retryable(UpstreamTimeout("slow")) and retry.is_retryable(RateLimited("429"))
    assert not retry.is_retryable(BadUpstreamRequest("400"))
    assert not retry.is_retryable(ValueError("a bug, not an upstream failure"))
