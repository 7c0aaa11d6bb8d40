"""The async PostgreSQL connection pool of the hot path (psycopg 3 AsyncConnections), one per event loop.

Django's ORM is sync: from async code every query hops into a worker thread (Channels' database_sync_to_async
is ONE thread per process, so websockets queue behind each other there). The hot path's few statements
(the credit hold, the record-and-charge, a chat turn's message writes) run here instead, on the event loop,
over a bounded pool (DB_ASYNC_POOL_MAX connections) that many calls and sockets share at once.

Why not psycopg_pool.AsyncConnectionPool: it keeps worker tasks on the loop that swallow a cancellation while
they run a maintenance task, so a loop that ends (every test's, asyncio.run's) can hang forever cancelling
them. This pool has no background task at all: connections open on demand, go back to an idle stack, and an
idle one the server closed is noticed (its socket reads EOF) before it is handed out.

- Each statement runs in autocommit: the hot statements are single statements (data-modifying CTEs), atomic
  by themselves, so a call costs one round trip and no BEGIN/COMMIT.
- The connection parameters are read from `connections['default'].settings_dict` at first use, so under
  pytest-django the pool reaches the test database.
- One pool per event loop (a pool's connections belong to the loop that opened them). A daphne process has
  one loop; a loop that is closed (a test's) has its pool's idle connections closed the next time a pool is
  made, or by `close_all()` (tests). A process that exits closes its sockets; autocommit leaves no
  transaction open behind.
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
from collections import Counter, deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import psycopg
import psycopg.errors
from django.conf import settings
from django.db import connections, utils
from psycopg.pq import TransactionStatus

from aiwriter.db import vendor
from aiwriter.observability import add_db_query

__all__ = ["PoolTimeout", "close", "close_all", "connection", "django_error", "enabled", "execute_fetchone",
           "fetchone", "get_pool", "psycopg"]

logger = logging.getLogger(__name__)

# Options in DATABASES OPTIONS that are Django's own, not libpq's.
_DJANGO_OPTIONS = {"pool", "isolation_level", "assume_role", "server_side_binding", "cursor_factory", "context"}


class PoolTimeout(Exception):
    """No connection free within DB_ASYNC_POOL_TIMEOUT: nothing was sent, the caller may take the sync path."""


def enabled() -> bool:
    """The hot path uses the async pool: on PostgreSQL, unless DB_ASYNC_POOL is off, on the main thread's loop.

    The server's event loop runs on the main thread (daphne). A loop on another thread is async_to_sync's own,
    made for one sync caller and closed after it: a pool there would open connections for a single call and
    leave them behind, so those callers keep the sync path they came from.
    """
    return (bool(getattr(settings, "DB_ASYNC_POOL", False)) and vendor() == "postgresql"
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


def _alive(conn: psycopg.AsyncConnection) -> bool:
    """An idle connection has nothing to read; a readable socket means the server (or a proxy) closed it."""
    if conn.closed or conn.broken:
        return False
    try:
        readable, _, _ = select.select([conn.pgconn.socket], [], [], 0)
    except (OSError, ValueError, psycopg.OperationalError):
        return False
    return not readable


def _finish(conn: psycopg.AsyncConnection) -> None:
    try:
        conn.pgconn.finish()  # closes the socket now, without awaiting on a loop that may be gone
    except Exception:  # noqa: BLE001 - closing is best effort
        pass


class AsyncPool:
    """At most `max_size` connections of one event loop, opened on demand, kept idle between uses (autocommit)."""

    def __init__(self, kwargs: dict[str, Any], *, max_size: int, timeout: float) -> None:
        self.kwargs = {**kwargs, "autocommit": True, "connect_timeout": max(1, round(timeout))}
        self.max_size, self.timeout = max_size, timeout
        self.idle: deque[psycopg.AsyncConnection] = deque()
        self.opened: weakref.WeakSet[psycopg.AsyncConnection] = weakref.WeakSet()  # idle or in use
        self.slots = asyncio.Semaphore(max_size)
        self.stats: Counter[str] = Counter()
        self.closed = False

    def get_stats(self) -> dict[str, int]:
        return {**self.stats, "pool_size": len(self.idle), "pool_max": self.max_size}

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection]:
        try:
            if self.slots.locked():  # all in use (or others waiting first): wait, at most the pool's timeout
                async with asyncio.timeout(self.timeout):
                    await self.slots.acquire()
            else:
                await self.slots.acquire()  # a free slot: taken at once, with no timer nor task (wait_for has both)
        except TimeoutError:
            self.stats["requests_errors"] += 1
            raise PoolTimeout(f"no connection free within {self.timeout} s") from None
        conn = None
        try:
            conn = await self._take()
            self.stats["requests_num"] += 1
            yield conn
        finally:
            if conn is not None:
                self._give_back(conn)
            self.slots.release()

    async def _take(self) -> psycopg.AsyncConnection:
        while self.idle:
            conn = self.idle.pop()  # the most recently used: warm, and the others may age out
            if _alive(conn):
                return conn
            self.stats["connections_lost"] += 1
            _finish(conn)
        self.stats["connections_num"] += 1
        conn = await psycopg.AsyncConnection.connect(**self.kwargs)
        self.opened.add(conn)
        return conn

    def _give_back(self, conn: psycopg.AsyncConnection) -> None:
        # Only an idle, healthy connection goes back: one interrupted mid-statement (a cancel) is dropped.
        if self.closed or conn.closed or conn.info.transaction_status != TransactionStatus.IDLE:
            _finish(conn)
        else:
            self.idle.append(conn)

    def close_now(self) -> None:
        """Closes every connection, in use too: called when the loop is gone (nothing can use them any more)."""
        self.closed = True
        self.idle.clear()
        for conn in list(self.opened):
            _finish(conn)


# Loop -> its pool. Weak keys: a loop that is gone takes its entry with it.
_pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncPool] = weakref.WeakKeyDictionary()
_all: list[tuple[weakref.ref, AsyncPool]] = []


async def get_pool() -> AsyncPool:
    """This loop's pool, made on first use."""
    loop = asyncio.get_running_loop()
    pool = _pools.get(loop)
    if pool is None:
        _sweep()
        pool = AsyncPool(conninfo_kwargs(), max_size=settings.DB_ASYNC_POOL_MAX,
                         timeout=settings.DB_ASYNC_POOL_TIMEOUT)
        _pools[loop] = pool
        _all.append((weakref.ref(loop), pool))
    return pool


@asynccontextmanager
async def connection() -> AsyncIterator[psycopg.AsyncConnection]:
    """A pooled connection (autocommit) for a few statements; back to the pool afterwards."""
    pool = await get_pool()
    async with pool.connection() as conn:
        yield conn


async def fetchone(sql: str, params: Sequence[Any] = ()) -> tuple | None:
    """One statement, one round trip; the first row (or None)."""
    async with connection() as conn:
        return await execute_fetchone(conn, sql, params)


async def execute_fetchone(conn: psycopg.AsyncConnection, sql: str, params: Sequence[Any] = ()) -> tuple | None:
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
    pool = _pools.pop(asyncio.get_running_loop(), None)
    if pool is not None:
        pool.close_now()


def _sweep() -> None:
    """Closes the pools of loops that have closed (a test's loop, asyncio.run's)."""
    keep = []
    for ref, pool in _all:
        loop = ref()
        if loop is None or loop.is_closed():
            pool.close_now()
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
        pool.close_now()
        if loop is not None:
            _pools.pop(loop, None)
    _all[:] = keep
