"""The deployed settings with this round's /v1 CPU cuts taken back (issue 13, second round): the "before".

    python -m bench.run --only none --compare bench.settings_before_round2

In the server that loads these settings only: the upstream call through the SDK's `post` per call, daphne's
requests with twisted's form parsing, the async pool's slot taken through `asyncio.wait_for`, and the message
storage built on every request. (The SQL text
built once per shape is not undone: a few percent at most.)
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from agents.llm import providers
from aiwriter import dbpool
from aiwriter.settings import *  # noqa: F403


async def _sdk_post(self: Any, body: dict[str, Any]) -> Any:
    import httpx2

    return await self.client.post("/chat/completions", cast_to=httpx2.Response, body=body, stream=True)


@asynccontextmanager
async def _connection(self: Any) -> AsyncIterator[Any]:
    try:
        await asyncio.wait_for(self.slots.acquire(), self.timeout)
    except TimeoutError:
        self.stats["requests_errors"] += 1
        raise dbpool.PoolTimeout(f"no connection free within {self.timeout} s") from None
    conn = None
    try:
        conn = await self._take()
        self.stats["requests_num"] += 1
        yield conn
    finally:
        if conn is not None:
            self._give_back(conn)
        self.slots.release()


providers._Wire.send = _sdk_post  # type: ignore[method-assign]
dbpool.AsyncPool.connection = _connection  # type: ignore[method-assign]
_daphne = sys.modules.get("daphne.http_protocol")
if _daphne is not None:
    _daphne.WebRequest._aiwriter_no_form_parsing = True  # apply() then does nothing
MIDDLEWARE = [f"{__name__}.EagerMessageMiddleware" if m == "aiwriter.asyncmw.MessageMiddleware" else m
              for m in MIDDLEWARE]  # noqa: F405


def __getattr__(name: str) -> Any:
    """EagerMessageMiddleware, built when Django loads the middleware (its imports need the apps ready)."""
    if name != "EagerMessageMiddleware":
        raise AttributeError(name)
    from django.contrib.messages import middleware as messages

    from aiwriter import asyncmw

    class EagerMessageMiddleware(asyncmw.MessageMiddleware):
        process_request = messages.MessageMiddleware.process_request
        process_response = messages.MessageMiddleware.process_response

    globals()[name] = EagerMessageMiddleware
    return EagerMessageMiddleware
