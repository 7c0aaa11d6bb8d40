"""Per-deployment limits (requests/min, tokens/min, concurrent calls), shared by all processes through Redis.

RPM and TPM use a sliding-window counter (this minute's count plus the overlapping part of the last
minute's); concurrency uses a sorted set of leases that expire, so a crashed process cannot leak slots.
One Lua script checks and takes all three atomically. Without REDIS_URL (or when Redis fails) the same
algorithm runs in process.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
import weakref
from dataclasses import dataclass
from typing import Any

from aiwriter import redis_guard
from aiwriter.redis import get_async_redis
from aiwriter.redis import key as redis_key

WINDOW = 60.0
RPM, TPM, CONCURRENCY = 1, 2, 3
_REASONS = {RPM: "requests per minute", TPM: "tokens per minute", CONCURRENCY: "concurrent calls"}

_ACQUIRE = """
local now = tonumber(ARGV[1])
local wprev = tonumber(ARGV[2])
local rpm = tonumber(ARGV[3])
local tpm = tonumber(ARGV[4])
local tokens = tonumber(ARGV[5])
local conc = tonumber(ARGV[6])
if rpm > 0 then
  local used = tonumber(redis.call('GET', KEYS[1]) or '0') + wprev * tonumber(redis.call('GET', KEYS[2]) or '0')
  if used + 1 > rpm then return 1 end
end
if tpm > 0 then
  local used = tonumber(redis.call('GET', KEYS[3]) or '0') + wprev * tonumber(redis.call('GET', KEYS[4]) or '0')
  if used > 0 and used + tokens > tpm then return 2 end
end
if conc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now)
  if redis.call('ZCARD', KEYS[5]) >= conc then return 3 end
end
if rpm > 0 then redis.call('INCR', KEYS[1]); redis.call('EXPIRE', KEYS[1], 180) end
if tpm > 0 then redis.call('INCRBY', KEYS[3], tokens); redis.call('EXPIRE', KEYS[3], 180) end
if conc > 0 then
  redis.call('ZADD', KEYS[5], now + tonumber(ARGV[8]), ARGV[7])
  redis.call('EXPIRE', KEYS[5], math.ceil(tonumber(ARGV[8])) + 60)
end
return 0
"""


@dataclass(frozen=True)
class Limits:
    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None
    lease_seconds: float = 300.0  # a lease outlives any call; it only matters if a process dies mid-call

    @property
    def unlimited(self) -> bool:
        return not (self.rpm or self.tpm or self.concurrency)


@dataclass
class Lease:
    deployment_id: int
    lease_id: str
    tokens: int
    window: int
    redis: bool


@dataclass
class Refusal:
    reason: str
    retry_after: float


def _window(now: float) -> tuple[int, float]:
    """Current window number and the weight of the previous window still inside the sliding minute."""
    window = int(now // WINDOW)
    return window, 1.0 - (now - window * WINDOW) / WINDOW


def _retry_after(code: int, now: float) -> float:
    if code == CONCURRENCY:
        return 0.05
    return max(0.05, WINDOW - (now % WINDOW)) if code == RPM else max(0.05, (WINDOW - now % WINDOW) / 2)


class _Local:
    """The same algorithm in process, for runs without Redis."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counters: dict[tuple[int, str, int], float] = {}
        self.leases: dict[int, dict[str, float]] = {}

    def acquire(self, dep: int, limits: Limits, tokens: int, lease_id: str, now: float) -> int:
        window, wprev = _window(now)
        c = self.counters
        with self.lock:
            if limits.rpm:
                used = c.get((dep, "rpm", window), 0) + wprev * c.get((dep, "rpm", window - 1), 0)
                if used + 1 > limits.rpm:
                    return RPM
            if limits.tpm:
                used = c.get((dep, "tpm", window), 0) + wprev * c.get((dep, "tpm", window - 1), 0)
                if used > 0 and used + tokens > limits.tpm:
                    return TPM
            leases = self.leases.setdefault(dep, {})
            if limits.concurrency:
                for lid in [lid for lid, until in leases.items() if until <= now]:
                    del leases[lid]
                if len(leases) >= limits.concurrency:
                    return CONCURRENCY
            if limits.rpm:
                c[(dep, "rpm", window)] = c.get((dep, "rpm", window), 0) + 1
            if limits.tpm:
                c[(dep, "tpm", window)] = c.get((dep, "tpm", window), 0) + tokens
            if limits.concurrency:
                leases[lease_id] = now + limits.lease_seconds
            for k in [k for k in c if k[2] < window - 1]:
                del c[k]
            return 0

    def add_tokens(self, dep: int, window: int, tokens: int) -> None:
        with self.lock:
            self.counters[(dep, "tpm", window)] = self.counters.get((dep, "tpm", window), 0) + tokens

    def release(self, dep: int, lease_id: str) -> None:
        with self.lock:
            self.leases.get(dep, {}).pop(lease_id, None)


_local = _Local()


# The acquire script, registered once per client (clients are per event loop).
_scripts: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def _keys(dep: int, window: int) -> list[str]:
    return [redis_key("rl", dep, "rpm", window), redis_key("rl", dep, "rpm", window - 1),
            redis_key("rl", dep, "tpm", window), redis_key("rl", dep, "tpm", window - 1),
            redis_key("rl", dep, "conc")]


async def acquire(deployment_id: int, limits: Limits, *, tokens: int = 0) -> Lease | Refusal:
    """Takes one request (+ `tokens`) and one concurrency slot, or says which limit refused and for how long."""
    lease_id = uuid.uuid4().hex
    now = time.time()
    window, wprev = _window(now)
    if limits.unlimited:
        return Lease(deployment_id, lease_id, tokens, window, redis=False)
    client = get_async_redis() if redis_guard.available() else None
    code = None
    if client is not None:
        try:
            script = _scripts.get(client)
            if script is None:
                script = _scripts[client] = client.register_script(_ACQUIRE)
            code = int(await script(keys=_keys(deployment_id, window), args=[
                now, wprev, limits.rpm or 0, limits.tpm or 0, tokens, limits.concurrency or 0, lease_id,
                limits.lease_seconds]))
        except Exception as exc:  # noqa: BLE001 - Redis down: limit in process rather than fail the call
            redis_guard.failed("rate limits", exc)
            code = None
    on_redis = code is not None
    if code is None:
        code = _local.acquire(deployment_id, limits, tokens, lease_id, now)
    if code:
        return Refusal(reason=_REASONS[code], retry_after=_retry_after(code, now))
    return Lease(deployment_id, lease_id, tokens, window, redis=on_redis)


async def settle(lease: Lease, limits: Limits, *, actual_tokens: int | None = None) -> None:
    """Gives the concurrency slot back and books tokens used beyond the estimate taken at acquire()."""
    if limits.unlimited:
        return
    extra = max(0, (actual_tokens or 0) - lease.tokens) if limits.tpm else 0
    if lease.redis:
        client = get_async_redis()
        if client is None:  # Redis switched off since the lease was taken: the lease expires by itself
            return
        try:
            async with client.pipeline(transaction=False) as pipe:
                if limits.concurrency:
                    pipe.zrem(redis_key("rl", lease.deployment_id, "conc"), lease.lease_id)
                if extra:
                    pipe.incrby(redis_key("rl", lease.deployment_id, "tpm", lease.window), extra)
                await pipe.execute()
            return
        except Exception as exc:  # noqa: BLE001 - the lease expires by itself
            redis_guard.failed("rate limits", exc)
            return
    _local.release(lease.deployment_id, lease.lease_id)
    if extra:
        _local.add_tokens(lease.deployment_id, lease.window, extra)


def limits_for(rpm: int | None, tpm: int | None, concurrency: int | None, timeout: float) -> Limits:
    return Limits(rpm=rpm or None, tpm=tpm or None, concurrency=concurrency or None,
                  lease_seconds=max(60.0, math.ceil(timeout * 4)))


def reset() -> None:
    global _local
    _local = _Local()
