"""Per-API-key request and token rate limits (ApiKey.rpm / ApiKey.tpm).

Fixed one-minute windows counted in Redis, so every process shares one count; with REDIS_URL unset
(one embedded process) the counts live in this process. A request is refused when the window
already holds `rpm` requests, or when the window's tokens plus this prompt would pass `tpm`; the
tokens a call really used are added when it ends. Refusals carry Retry-After = seconds to the next
window. A Redis outage lets calls through (logged): the key's monthly budget, enforced in metering,
still bounds the spend.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any

import redis

from aiwriter.errors import ApiError
from aiwriter.redis import get_async_redis, key

logger = logging.getLogger(__name__)

WINDOW_SECONDS = 60


class KeyRateLimited(ApiError):
    status_code = 429
    code = "rate_limited"  # on /v1, OpenAI's "rate_limit_exceeded" (errors.from_api_error)
    message = "This API key's rate limit is reached."
    retryable = True


def _window(now: float) -> tuple[int, float]:
    """The current window number and the seconds left in it."""
    return int(now // WINDOW_SECONDS), WINDOW_SECONDS - (now % WINDOW_SECONDS)


def _refuse(limit: str, message: str, retry_after: float | None) -> KeyRateLimited:
    headers = {"Retry-After": str(max(1, math.ceil(retry_after)))} if retry_after is not None else {}
    return KeyRateLimited(message, headers=headers, retryable=retry_after is not None, extra={"limit": limit})


class _LocalCounters:
    """The in-process stand-in for Redis: {(name, key id, window): count}, old windows dropped."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, int, int], int] = {}

    def add(self, name: str, key_id: int, window: int, amount: int) -> int:
        with self._lock:
            if len(self._counts) > 10_000:
                self._counts = {k: v for k, v in self._counts.items() if k[2] >= window}
            total = self._counts.get((name, key_id, window), 0) + amount
            self._counts[(name, key_id, window)] = total
            return total

    def get(self, name: str, key_id: int, window: int) -> int:
        with self._lock:
            return self._counts.get((name, key_id, window), 0)

    def clear(self) -> None:
        with self._lock:
            self._counts.clear()


local_counters = _LocalCounters()


def _redis_key(name: str, key_id: int, window: int) -> str:
    return key("keylimit", name, key_id, window)


async def _count_request(api_key: Any, window: int) -> tuple[int, int]:
    """Adds this request to the window; returns (requests, tokens) in the window so far."""
    client = get_async_redis()
    if client is None:
        return local_counters.add("rpm", api_key.pk, window, 1), local_counters.get("tpm", api_key.pk, window)
    requests_key = _redis_key("rpm", api_key.pk, window)
    async with client.pipeline(transaction=True) as pipe:
        pipe.incr(requests_key)
        pipe.expire(requests_key, WINDOW_SECONDS * 2)
        pipe.get(_redis_key("tpm", api_key.pk, window))
        requests, _, used_tokens = await pipe.execute()
    return int(requests), int(used_tokens or 0)


async def _uncount_request(api_key: Any, window: int) -> None:
    """A refused request doesn't use up the window."""
    client = get_async_redis()
    if client is None:
        local_counters.add("rpm", api_key.pk, window, -1)
        return
    await client.decr(_redis_key("rpm", api_key.pk, window))


async def acquire(api_key: Any, *, prompt_tokens: int = 0, now: float | None = None) -> None:
    """Counts one request against the key's RPM and checks its TPM; raises KeyRateLimited (429)."""
    if api_key is None or not (api_key.rpm or api_key.tpm):
        return
    window, retry_after = _window(time.time() if now is None else now)
    if api_key.tpm and prompt_tokens > api_key.tpm:
        # Waiting won't help: the prompt alone is over the key's per-minute budget.
        raise _refuse("tokens", f"The prompt ({prompt_tokens} tokens) is larger than this key's limit of "
                                f"{api_key.tpm} tokens per minute.", None)
    try:
        requests, used_tokens = await _count_request(api_key, window)
        if api_key.rpm and requests > api_key.rpm:
            await _uncount_request(api_key, window)
            raise _refuse("requests", f"Rate limit reached: {api_key.rpm} requests per minute for this key.",
                          retry_after)
        if api_key.tpm and used_tokens + prompt_tokens > api_key.tpm:
            await _uncount_request(api_key, window)
            raise _refuse("tokens", f"Rate limit reached: {api_key.tpm} tokens per minute for this key.",
                          retry_after)
    except redis.RedisError as exc:
        logger.warning("key rate limits unavailable (%s); letting the call through", exc.__class__.__name__)


async def record_tokens(api_key: Any, tokens: int, *, now: float | None = None) -> None:
    """Adds the tokens a call used to the key's current window."""
    if api_key is None or not api_key.tpm or tokens <= 0:
        return
    window, _ = _window(time.time() if now is None else now)
    client = get_async_redis()
    try:
        if client is None:
            local_counters.add("tpm", api_key.pk, window, tokens)
            return
        tokens_key = _redis_key("tpm", api_key.pk, window)
        async with client.pipeline(transaction=True) as pipe:
            pipe.incrby(tokens_key, tokens)
            pipe.expire(tokens_key, WINDOW_SECONDS * 2)
            await pipe.execute()
    except redis.RedisError as exc:
        logger.warning("could not record key tokens (%s)", exc.__class__.__name__)
