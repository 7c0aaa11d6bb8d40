"""Per-API-key request and token rate limits (ApiKey.rpm / ApiKey.tpm).

Fixed one-minute windows counted in Redis, so every process shares one count; with REDIS_URL unset
(one embedded process) the counts live in this process. A request is refused when the window
already holds `rpm` requests, or when the window's tokens plus this prompt would pass `tpm`.

Tokens are held like the balance: admission reserves the prompt plus the call's maximum output (at
most what is left of the minute) in one atomic step, and `settle` replaces the hold by the tokens the
call really used when it ends. So concurrent calls see each other's holds, and a burst can pass `tpm`
by at most one call (the one whose real use outgrew its hold). A call without a known maximum output
holds the rest of the minute: the key's next calls wait for it to end. A hold that is never settled
(a killed process) dies with its window.

Refusals carry Retry-After = seconds to the next window. A Redis outage lets calls through (logged):
the key's monthly budget, enforced in metering, still bounds the spend.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
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


@dataclass
class Hold:
    """Tokens reserved in a key's window at admission, until `settle` puts the real figure in their place."""

    key_id: int
    window: int
    tokens: int
    settled: bool = False


# One atomic admission in Redis: count the request, check RPM, then check TPM and reserve the tokens.
# Returns {outcome, requests, used or held}: outcome 0 = admitted, 1 = over rpm, 2 = over tpm.
_ADMIT = """
local requests = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[5])
local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
if rpm > 0 and requests > rpm then
  redis.call('DECR', KEYS[1])
  return {1, requests, 0}
end
if tpm <= 0 then return {0, requests, 0} end
local used = tonumber(redis.call('GET', KEYS[2]) or '0')
local prompt, wanted = tonumber(ARGV[3]), tonumber(ARGV[4])
if used + prompt > tpm then
  redis.call('DECR', KEYS[1])
  return {2, requests, used}
end
local held = math.max(prompt, math.min(wanted, tpm - used))
redis.call('INCRBY', KEYS[2], held)
redis.call('EXPIRE', KEYS[2], ARGV[5])
return {0, requests, held}
"""


def _to_hold(tpm: int, prompt_tokens: int, max_output_tokens: int | None) -> int:
    """What a call asks to hold: its prompt plus its maximum output (unknown: the whole minute)."""
    if max_output_tokens is None:
        return tpm
    return prompt_tokens + max_output_tokens


def _admit_locally(api_key: Any, window: int, prompt_tokens: int, wanted: int) -> tuple[int, int]:
    with local_counters._lock:  # one step, as the Redis script
        counts = local_counters._counts
        if len(counts) > 10_000:
            local_counters._counts = counts = {k: v for k, v in counts.items() if k[2] >= window}
        requests = counts.get(("rpm", api_key.pk, window), 0) + 1
        if api_key.rpm and requests > api_key.rpm:
            return 1, 0
        counts[("rpm", api_key.pk, window)] = requests
        if not api_key.tpm:
            return 0, 0
        used = counts.get(("tpm", api_key.pk, window), 0)
        if used + prompt_tokens > api_key.tpm:
            counts[("rpm", api_key.pk, window)] = requests - 1
            return 2, used
        held = max(prompt_tokens, min(wanted, api_key.tpm - used))
        counts[("tpm", api_key.pk, window)] = used + held
        return 0, held


async def _admit(api_key: Any, window: int, prompt_tokens: int, wanted: int) -> tuple[int, int]:
    client = get_async_redis()
    if client is None:
        return _admit_locally(api_key, window, prompt_tokens, wanted)
    outcome, _, figure = await client.eval(
        _ADMIT, 2, _redis_key("rpm", api_key.pk, window), _redis_key("tpm", api_key.pk, window),
        api_key.rpm or 0, api_key.tpm or 0, prompt_tokens, wanted, WINDOW_SECONDS * 2)
    return int(outcome), int(figure)


async def acquire(api_key: Any, *, prompt_tokens: int = 0, max_output_tokens: int | None = None,
                  now: float | None = None) -> Hold | None:
    """Counts one request against the key's RPM and holds its tokens against its TPM; raises
    KeyRateLimited (429). Returns the hold to `settle` when the call ends (None: nothing held)."""
    if api_key is None or not (api_key.rpm or api_key.tpm):
        return None
    window, retry_after = _window(time.time() if now is None else now)
    if api_key.tpm and prompt_tokens > api_key.tpm:
        # Waiting won't help: the prompt alone is over the key's per-minute budget.
        raise _refuse("tokens", f"The prompt ({prompt_tokens} tokens) is larger than this key's limit of "
                                f"{api_key.tpm} tokens per minute.", None)
    wanted = _to_hold(api_key.tpm or 0, prompt_tokens, max_output_tokens)
    try:
        outcome, held = await _admit(api_key, window, prompt_tokens, wanted)
    except redis.RedisError as exc:
        logger.warning("key rate limits unavailable (%s); letting the call through", exc.__class__.__name__)
        return None
    if outcome == 1:
        raise _refuse("requests", f"Rate limit reached: {api_key.rpm} requests per minute for this key.",
                      retry_after)
    if outcome == 2:
        raise _refuse("tokens", f"Rate limit reached: {api_key.tpm} tokens per minute for this key.",
                      retry_after)
    return Hold(key_id=api_key.pk, window=window, tokens=held) if api_key.tpm else None


async def _add(key_id: int, window: int, tokens: int) -> None:
    client = get_async_redis()
    if client is None:
        local_counters.add("tpm", key_id, window, tokens)
        return
    tokens_key = _redis_key("tpm", key_id, window)
    async with client.pipeline(transaction=True) as pipe:
        pipe.incrby(tokens_key, tokens)
        pipe.expire(tokens_key, WINDOW_SECONDS * 2)
        await pipe.execute()


async def settle(hold: Hold | None, tokens: int, *, now: float | None = None) -> None:
    """Replaces a hold by the tokens the call really used (in the window it was taken in). Once only."""
    if hold is None or hold.settled:
        return
    hold.settled = True
    current, _ = _window(time.time() if now is None else now)
    if hold.window < current - 1 or tokens == hold.tokens:
        return  # that window's count is gone (or about to be): nothing left to correct
    try:
        await _add(hold.key_id, hold.window, max(0, tokens) - hold.tokens)
    except redis.RedisError as exc:
        logger.warning("could not settle key tokens (%s)", exc.__class__.__name__)


async def record_tokens(api_key: Any, tokens: int, *, now: float | None = None) -> None:
    """Adds tokens to the key's current window (a call admitted without a hold, e.g. while Redis was down)."""
    if api_key is None or not api_key.tpm or tokens <= 0:
        return
    window, _ = _window(time.time() if now is None else now)
    try:
        await _add(api_key.pk, window, tokens)
    except redis.RedisError as exc:
        logger.warning("could not record key tokens (%s)", exc.__class__.__name__)
