"""Database connection helpers."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from django.conf import settings
from django.db import connection, connections

logger = logging.getLogger(__name__)
P = ParamSpec("P")
R = TypeVar("R")


def vendor() -> str:
    """The default database's vendor ("postgresql", "sqlite"), without the per-thread connection lookup that
    `connection.vendor` costs on every call of the hot path."""
    return _vendor_of(settings.DATABASES["default"]["ENGINE"])


@functools.cache
def _vendor_of(engine: str) -> str:
    return connections["default"].vendor


@functools.cache
def quote_name(name: str) -> str:
    """`connection.ops.quote_name`, memoised: a process has one default backend, and the hot path's raw SQL
    quotes the same few names on every call."""
    return connections["default"].ops.quote_name(name)


def release_connection() -> None:
    """With the connection pool on (PostgreSQL's default), gives this thread's connection back to the pool.

    A request keeps its thread's connection until it ends; a model call can take seconds to minutes, so
    holding one across it would cap a process's concurrent calls at the pool size. Called before such a
    wait, outside any transaction; the next query takes a connection again (waiting for one if need be).
    A no-op without the pool, where reconnecting would only cost time.
    """
    if connection.connection is None or connection.in_atomic_block:
        return
    if not connection.settings_dict.get("OPTIONS", {}).get("pool"):
        return
    try:
        connection.close()
    except Exception:  # noqa: BLE001 - a broken connection is dropped by the pool anyway
        logger.debug("releasing the database connection failed", exc_info=True)


def released(func: Callable[P, R]) -> Callable[P, R]:
    """`func`, then `release_connection()`: for a query made from async code, which then awaits other things."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        finally:
            release_connection()

    return wrapper
