"""One load for many waiters: concurrent callers asking for the same expired cache entry share a single load.

Without it, when an in-process cache entry (a model's route, its prices) expires under load, every call in flight
loads it again, each through its own thread hop, and they queue behind each other: at 1,000 concurrent chats that
queue held every chat's first token for seconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, TypeVar

T = TypeVar("T")

# Keyed by the loop too: a future belongs to the loop that made it (tests run many loops).
_inflight: dict[tuple[int, Hashable], asyncio.Future[Any]] = {}


async def shared_load(key: Hashable, load: Callable[[], Awaitable[T]]) -> T:
    """Awaits `load()` once for all concurrent callers with this key; each caller gets its result or its error.
    A caller that is cancelled does not cancel the load for the others."""
    slot = (id(asyncio.get_running_loop()), key)
    future = _inflight.get(slot)
    if future is None:
        future = asyncio.ensure_future(load())
        _inflight[slot] = future
        future.add_done_callback(lambda done: _forget(slot, done))
    result: T = await asyncio.shield(future)
    return result


def _forget(slot: tuple[int, Hashable], done: asyncio.Future[Any]) -> None:
    if _inflight.get(slot) is done:
        del _inflight[slot]
    if not done.cancelled():
        done.exception()  # retrieved: an error every waiter already got is not logged again as "never retrieved"
