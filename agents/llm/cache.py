"""Two-tier response cache: an in-process LRU with TTL, then Redis (or the Django cache without Redis).

Key = public model + messages + sampling options. Only deterministic requests are cached (temperature 0,
or `ChatRequest.cache=True`); `cache=False` never is. Keys look like "<model>:<sha256>", so clearing by
the glob pattern "gpt-4o:*" drops one model's entries.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.core.cache import cache as django_cache

from agents.llm.types import ChatRequest
from aiwriter import redis_guard
from aiwriter.redis import get_async_redis, get_redis
from aiwriter.redis import key as redis_key

MEMORY, REDIS, ALL = "memory", "redis", "all"
_SAMPLING = ("temperature", "top_p", "max_tokens", "stop", "response_format")


def cacheable(request: ChatRequest) -> bool:
    if request.tools:  # a reply may be function calls, which the cache does not keep
        return False
    if request.cache is not None:
        return request.cache
    return request.temperature is not None and float(request.temperature) == 0.0


def cache_key(request: ChatRequest) -> str:
    material = {"messages": request.messages, **{n: getattr(request, n) for n in _SAMPLING}, "extra": request.extra}
    digest = hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()
    return f"{request.model}:{digest}"


class MemoryTier:
    def __init__(self, max_entries: int, ttl: float) -> None:
        self.max_entries, self.ttl = max_entries, ttl
        self.entries: OrderedDict[str, tuple[float, dict[str, Any]]] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: str) -> dict[str, Any] | None:
        with self.lock:
            item = self.entries.get(key)
            if item is None:
                return None
            if item[0] <= time.monotonic():
                del self.entries[key]
                return None
            self.entries.move_to_end(key)
            return item[1]

    def set(self, key: str, value: dict[str, Any]) -> None:
        with self.lock:
            self.entries[key] = (time.monotonic() + self.ttl, value)
            self.entries.move_to_end(key)
            while len(self.entries) > self.max_entries:
                self.entries.popitem(last=False)

    def clear(self, pattern: str) -> int:
        with self.lock:
            doomed = [k for k in self.entries if fnmatch.fnmatchcase(k, pattern)]
            for k in doomed:
                del self.entries[k]
            return len(doomed)

    def size(self) -> int:
        return len(self.entries)


class SharedTier:
    """Redis when configured (shared by all processes); else the Django cache plus a key index in process."""

    def __init__(self, ttl: int) -> None:
        self.ttl = ttl
        self.known: set[str] = set()  # only needed without Redis, where the Django cache cannot be scanned

    async def get(self, key: str) -> dict[str, Any] | None:
        client = get_async_redis()
        if client is not None and not redis_guard.available():
            return None
        try:
            raw = await client.get(redis_key("llmcache", key)) if client else await django_cache.aget(f"llmcache:{key}")
        except Exception as exc:  # noqa: BLE001 - the cache only accelerates
            redis_guard.failed("the response cache", exc)
            return None
        return json.loads(raw) if raw else None

    async def set(self, key: str, value: dict[str, Any]) -> None:
        raw = json.dumps(value)
        client = get_async_redis()
        if client is not None and not redis_guard.available():
            return
        try:
            if client:
                await client.set(redis_key("llmcache", key), raw, ex=self.ttl)
            else:
                await django_cache.aset(f"llmcache:{key}", raw, self.ttl)
                self.known.add(key)
        except Exception as exc:  # noqa: BLE001 - the cache only accelerates
            redis_guard.failed("the response cache", exc)

    def clear(self, pattern: str) -> int:
        client = get_redis()
        if client is None:
            doomed = [k for k in self.known if fnmatch.fnmatchcase(k, pattern)]
            django_cache.delete_many([f"llmcache:{k}" for k in doomed])
            self.known.difference_update(doomed)
            return len(doomed)
        count = 0
        batch: list[bytes] = []
        for k in client.scan_iter(match=redis_key("llmcache", pattern), count=500):
            batch.append(k)
            if len(batch) >= 500:
                count += client.delete(*batch)
                batch = []
        if batch:
            count += client.delete(*batch)
        return count

    def size(self) -> int:
        client = get_redis()
        if client is None:
            return len(self.known)
        return sum(1 for _ in client.scan_iter(match=redis_key("llmcache", "*"), count=1000))


@dataclass
class Stats:
    memory_hits: int = 0
    redis_hits: int = 0
    misses: int = 0
    sets: int = 0


class ResponseCache:
    def __init__(self) -> None:
        self.memory = MemoryTier(settings.LLM_CACHE_MEMORY_ENTRIES, settings.LLM_CACHE_TTL_SECONDS)
        self.shared = SharedTier(settings.LLM_CACHE_TTL_SECONDS)
        self.counts = Stats()

    async def get(self, key: str) -> dict[str, Any] | None:
        value = self.memory.get(key)
        if value is not None:
            self.counts.memory_hits += 1
            return value
        value = await self.shared.get(key)
        if value is not None:
            self.counts.redis_hits += 1
            self.memory.set(key, value)
            return value
        self.counts.misses += 1
        return None

    async def set(self, key: str, value: dict[str, Any]) -> None:
        self.counts.sets += 1
        self.memory.set(key, value)
        await self.shared.set(key, value)

    def clear(self, pattern: str | None = None, tier: str = ALL) -> dict[str, int]:
        """Sync: called from views and management code. Returns the keys cleared per tier."""
        pattern = pattern or "*"
        cleared = {}
        if tier in (MEMORY, ALL):
            cleared[MEMORY] = self.memory.clear(pattern)
        if tier in (REDIS, ALL):
            cleared[REDIS] = self.shared.clear(pattern)
        return cleared

    def stats(self) -> dict[str, Any]:
        c = self.counts
        hits = c.memory_hits + c.redis_hits
        lookups = hits + c.misses
        return {
            "hits": hits, "memory_hits": c.memory_hits, "redis_hits": c.redis_hits, "misses": c.misses,
            "sets": c.sets, "hit_rate": round(hits / lookups, 4) if lookups else 0.0,
            "size": {MEMORY: self.memory.size(), REDIS: self.shared.size()},
        }


response_cache = ResponseCache()


def reset() -> None:
    global response_cache
    response_cache = ResponseCache()
