"""The async PostgreSQL connection pool of the hot path (psycopg 3's AsyncConnectionPool), one per event loop.

Django's ORM is sync: from async code every query hops into a worker thread (Channels' database_sync_to_async
is ONE thread per process, so websockets queue behind each other there). The hot path's few statements
(the credit hold, the record-and-charge, a chat turn's message writes) run here instead, on the event loop,
over a bounded pool (DB_ASYNC_POOL_MIN / DB_ASYNC_POOL_MAX) that many calls and sockets share at once.

- Each statement runs in autocommit: the hot statements are single statements (data-modifying CTEs), atomic
  by themselves, so a call costs one round trip and no BEGIN/COMMIT.
- The connection parameters are read from `connections['default'].settings_dict` at first use, so under
  pytest-django the pool reaches the test database.
- One pool per event loop (a pool's connections belong to the loop that opened them). A daphne process has
  one loop; a loop that is closed (a test's, async_to_sync's own) has its pool's connections closed the
  next time a pool is made, or by `close_all()` (tests, shutdown).
- Queries count in the request's Server-Timing `db` figure like the ORM's.

`enabled()` says whether to use it: PostgreSQL and DB_ASYNC_POOL (on by default). Callers keep the sync
ORM path for everything else (SQLite, the cold paths).
"""

from __future__ import annotations

import asyncio
import logging
import select
import threading
import time
import weakref
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import psycopg
import psycopg.errors
from django.conf import settings
from django.db import connections, utils
from psycopg_pool import AsyncConnectionPool, PoolTimeout

__all__ = ["PoolTimeout", "close", "close_all", "connection", "django_error", "enabled", "execute_fetchone",
           "fetchone", "get_pool", "psycopg"]

from aiwriter.observability import add_db_query

logger = logging.getLogger(__name__)

# Loop -> its pool. Weak keys: a loop that is gone takes its entry with it (its connections are closed first
# by _sweep when we notice it closed).
_pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = weakref.WeakKeyDictionary()
# Pools whose loop may have closed under them; closed synchronously by _sweep.
_all: list[tuple[weakref.ref, Any]] = []

# Options in DATABASES OPTIONS that are Django's own, not libpq's.
_DJANGO_OPTIONS = {"pool", "isolation_level", "assume_role", "server_side_binding", "cursor_factory", "context"}


def enabled() -> bool:
    """The hot path uses the async pool: on PostgreSQL, unless DB_ASYNC_POOL is off, on the main thread's loop.

    The server's event loop runs on the main thread (daphne). A loop on another thread is async_to_sync's own,
    made for one sync caller and closed after it: a pool there would open connections for a single call and
    leave them behind, so those callers keep the sync path they came from.
    """
    return (bool(getattr(settings, "DB_ASYNC_POOL", False)) and connections["default"].vendor == "postgresql"
            and threading.current_thread() is threading.main_thread())


def conninfo_kwargs() -> dict[str, Any]:
    """libpq parameters of the default database, as Django would connect (the test database under pytest)."""
    s = connections["default"].settings_dict
    kwargs: dict[str, Any] = {"dbname": s.get("NAME") or "postgres"}
    for key, name in (("USER", "user"), ("PASSWORD", "password"), ("HOST", "host"), ("PORT", "port")):
        if s.get(key):
            kwargs[name] = str(s[key])
    for key, value in (s.get("OPTIONS") or {}).items():
        if key not in _DJANGO_OPTIONS:
            kwargs[key] = value
    return kwargs


async def _check(conn: Any) -> None:
    """Given out only if alive. An idle connection the server (or a proxy) closed has its socket readable (EOF):
    only then is a round trip paid, to confirm; a broken one is discarded and another tried (or opened)."""
    try:
        readable, _, _ = select.select([conn.pgconn.socket], [], [], 0)
    except (OSError, ValueError, psycopg.OperationalError):
        readable = [True]
    if readable or conn.closed:
        await AsyncConnectionPool.check_connection(conn)


async def get_pool() -> Any:
    """This loop's pool, opened on first use."""
    loop = asyncio.get_running_loop()
    pool = _pools.get(loop)
    if pool is not None:
        return pool
    _sweep()
    # Autocommit: every hot statement is atomic by itself, so no BEGIN/COMMIT round trips.
    pool = AsyncConnectionPool(
        kwargs={**conninfo_kwargs(), "autocommit": True}, min_size=settings.DB_ASYNC_POOL_MIN,
        max_size=settings.DB_ASYNC_POOL_MAX, timeout=settings.DB_ASYNC_POOL_TIMEOUT, check=_check, open=False,
        name="aiwriter-hot")
    _pools[loop] = pool
    _all.append((weakref.ref(loop), pool))
    await pool.open(wait=False)
    return pool


@asynccontextmanager
async def connection() -> AsyncIterator[Any]:
    """A pooled connection (autocommit) for a few statements; back to the pool afterwards."""
    pool = await get_pool()
    async with pool.connection() as conn:
        yield conn


async def fetchone(sql: str, params: Sequence[Any] = ()) -> tuple | None:
    """One statement, one round trip; the first row (or None)."""
    async with connection() as conn:
        return await execute_fetchone(conn, sql, params)


async def execute_fetchone(conn: Any, sql: str, params: Sequence[Any] = ()) -> tuple | None:
    started = time.perf_counter()
    try:
        cursor = await conn.execute(sql, params)
        return await cursor.fetchone() if cursor.description else None
    finally:
        add_db_query((time.perf_counter() - started) * 1000)


def django_error(exc: Exception) -> Exception:
    """The django.db exception for a psycopg one, so callers handle both paths' failures alike (503 etc.)."""
    for cls in (utils.OperationalError, utils.InterfaceError, utils.IntegrityError, utils.DataError,
                utils.ProgrammingError, utils.InternalError, utils.NotSupportedError):
        if isinstance(exc, getattr(psycopg, cls.__name__)):
            return cls(*exc.args)
    return utils.DatabaseError(*exc.args)


async def close() -> None:
    """Closes this loop's pool (at shutdown)."""
    loop = asyncio.get_running_loop()
    pool = _pools.pop(loop, None)
    if pool is not None:
        await pool.close()


def _force_close(pool: Any) -> None:
    # The pool's loop is gone: nothing can await on it any more. Close the sockets directly.
    for conn in list(getattr(pool, "_pool", ())):
        try:
            conn.pgconn.finish()
        except Exception:  # noqa: BLE001 - closing is best effort
            pass
    pool._closed = True


def _sweep() -> None:
    """Closes the pools of loops that have closed (a test's loop, a finished async_to_sync)."""
    keep = []
    for ref, pool in _all:
        loop = ref()
        if loop is None or loop.is_closed():
            _force_close(pool)
        else:
            keep.append((ref, pool))
    _all[:] = keep


def close_all() -> None:
    """Closes every pool whose loop is not running (tests: before the test database is dropped)."""
    keep = []
    for ref, pool in _all:
        loop = ref()
        if loop is not None and loop.is_running():
            keep.append((ref, pool))
            continue
        _force_close(pool)
        if loop is not None:
            _pools.pop(loop, None)
    _all[:] = keep
