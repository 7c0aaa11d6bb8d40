"""How many websocket turns of this process begin at once (WS_TURN_STARTS_AT_ONCE); the others wait their turn.

A turn's start (conversation, lock, sequence numbers, messages: several statements and scripts) is most of a turn's
work before its first delta. Under a burst the event loop shares itself among every turn in progress, so when a
thousand begin together, each waits for nearly all of them and the median first delta comes as late as the last.
Admitted in order, a few at a time, the early ones reach their first delta while the rest queue, the connection
pool is not oversubscribed, and streams already running keep their pace (and their leases' renewals).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from django.conf import settings

# One per event loop (a Semaphore binds to the loop that first waits on it; tests run one loop per test).
_slots: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = weakref.WeakKeyDictionary()


@asynccontextmanager
async def turn_start() -> AsyncIterator[None]:
    limit = settings.WS_TURN_STARTS_AT_ONCE
    if limit <= 0:
        yield
        return
    loop = asyncio.get_running_loop()
    slots = _slots.get(loop)
    if slots is None:
        slots = _slots[loop] = asyncio.Semaphore(limit)
    async with slots:
        yield
