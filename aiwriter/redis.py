"""Shared Redis clients for locks, counters and sequence numbers (None when REDIS_URL is unset)."""

from __future__ import annotations

from functools import lru_cache

import redis
import redis.asyncio as aioredis
from django.conf import settings


@lru_cache(maxsize=1)
def get_redis() -> redis.Redis | None:
    if not settings.REDIS_URL:
        return None
    return redis.Redis.from_url(settings.REDIS_URL, socket_timeout=1, socket_connect_timeout=1,
                                health_check_interval=30)


_async_clients: dict[int, aioredis.Redis] = {}


def get_async_redis() -> aioredis.Redis | None:
    """One async client per event loop (a client is bound to the loop that made it)."""
    if not settings.REDIS_URL:
        return None
    import asyncio

    loop_id = id(asyncio.get_running_loop())
    client = _async_clients.get(loop_id)
    if client is None:
        client = aioredis.Redis.from_url(settings.REDIS_URL, socket_timeout=1, socket_connect_timeout=1)
        _async_clients[loop_id] = client
    return client


def key(*parts: object) -> str:
    return ":".join([settings.REDIS_KEY_PREFIX, *map(str, parts)])
