"""Shared Redis clients for locks, counters and sequence numbers (None when REDIS_URL is unset)."""

from __future__ import annotations

import asyncio
import weakref
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


ASYNC_MAX_CONNECTIONS = 100  # per process (event loop)
ASYNC_POOL_WAIT_SECONDS = 5.0

# Keyed by the loop itself, weakly: keyed by id(loop), a new loop could reuse a dead loop's id and get a client
# bound to that closed loop (every command then fails).
_async_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aioredis.Redis] = weakref.WeakKeyDictionary()


def get_async_redis() -> aioredis.Redis | None:
    """One async client per event loop (a client is bound to the loop that made it)."""
    if not settings.REDIS_URL:
        return None
    loop = asyncio.get_running_loop()
    client = _async_clients.get(loop)
    if client is None:
        # A blocking pool: a burst of sockets (leases, locks, sequence numbers) waits a moment for a connection
        # instead of failing with MaxConnectionsError once ASYNC_MAX_CONNECTIONS commands are in flight.
        pool = aioredis.BlockingConnectionPool.from_url(
            settings.REDIS_URL, max_connections=ASYNC_MAX_CONNECTIONS, timeout=ASYNC_POOL_WAIT_SECONDS,
            socket_timeout=1, socket_connect_timeout=1)
        client = aioredis.Redis(connection_pool=pool)
        _async_clients[loop] = client
    return client


def key(*parts: object) -> str:
    return ":".join([settings.REDIS_KEY_PREFIX, *map(str, parts)])
