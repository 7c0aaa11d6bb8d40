"""Django's ASGIHandler without its two thread hops per request when the request did no sync work in a thread.

Django 5.2 sends `request_started` through `Signal.asend` (its sync receivers in sync_to_async) and closes the
response through `sync_to_async(response.close)` (which sends `request_finished`). Each request runs in its own
ThreadSensitiveContext, so the first hop starts a fresh worker thread and the context's exit starts another to join
it: two hops and two thread starts per request, ~10 % of the server's CPU for a /v1 call (docs/BENCHMARKS.md).

Django's own receivers of those signals act on the calling thread's state: `reset_queries` and
`close_old_connections` on that thread's database connections, `close_caches`, `reset_urlconf`. A request's worker
thread is new, so at `request_started` it has no connection and the hop does nothing; at the end it matters only if
the request ran sync code in that thread (an ORM view, a sync middleware step, a cold cache on /v1). So:

- `request_started`: sent on the loop when its receivers are only those (else as Django does);
- the response's close: on the loop when the request started no worker thread and `request_finished`'s receivers
  are only those; else in the worker thread, exactly as Django does, so its connections are closed there.
"""

from __future__ import annotations

import asyncio
from typing import Any

from asgiref.sync import SyncToAsync, ThreadSensitiveContext, sync_to_async
from django.core import signals
from django.core.cache import close_caches
from django.core.exceptions import RequestAborted
from django.core.handlers.asgi import ASGIHandler, get_script_prefix
from django.core.handlers.base import reset_urlconf
from django.db import close_old_connections, reset_queries
from django.dispatch import Signal
from django.http import HttpResponseBase
from django.urls import set_script_prefix

# Receivers that only touch the calling thread's own state (see above): safe on the event loop.
_LOOP_SAFE = frozenset({reset_queries, close_old_connections, close_caches, reset_urlconf})


def _loop_safe(signal: Signal, sender: type) -> bool:
    sync_receivers, async_receivers = signal._live_receivers(sender)
    return not async_receivers and all(receiver in _LOOP_SAFE for receiver in sync_receivers)


def _worker_thread_started() -> bool:
    """True when this request's ThreadSensitiveContext has a worker thread (some sync code ran in it)."""
    context = SyncToAsync.thread_sensitive_context.get(None)
    executors = getattr(SyncToAsync, "context_to_thread_executor", None)
    return context is None or executors is None or context in executors


class LoopASGIHandler(ASGIHandler):
    """ASGIHandler whose request_started and response close stay on the event loop when that is equivalent."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            raise ValueError(f"Django can only handle ASGI/HTTP connections, not {scope['type']}.")
        async with ThreadSensitiveContext():
            await self.handle(scope, receive, send)

    async def handle(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Django 5.2's ASGIHandler.handle, but for `_request_started` and `_close`."""
        try:
            body_file = await self.read_body(receive)
        except RequestAborted:
            return
        set_script_prefix(get_script_prefix(scope))
        await self._request_started(scope)
        request, error_response = self.create_request(scope, body_file)
        if request is None:
            assert error_response is not None  # create_request gives one or the other
            body_file.close()
            await self.send_response(error_response, send)
            await self._close(error_response)
            return

        async def process_request(request: Any, send: Any) -> HttpResponseBase:
            response = await self.run_get_response(request)
            try:
                await self.send_response(response, send)
            except asyncio.CancelledError:
                pass  # the client disconnected during send_response
            return response

        # Catch a disconnect while getting the response; the disconnect listener goes first (see Django's).
        tasks = [
            asyncio.create_task(self.listen_for_disconnect(receive)),
            asyncio.create_task(process_request(request, send)),
        ]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            if task.done():
                try:
                    task.result()
                except RequestAborted:
                    pass
                except AssertionError:
                    body_file.close()
                    raise
            else:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        try:
            response = tasks[1].result()
        except asyncio.CancelledError:
            await signals.request_finished.asend(sender=self.__class__)
        else:
            await self._close(response)
        body_file.close()

    def adapt_method_mode(self, is_async: bool, method: Any, *args: Any, **kwargs: Any) -> Any:
        """A middleware's own async process_view (`aprocess_view`, aiwriter.asyncmw) instead of Django wrapping its
        sync one in a thread hop: for /v1 (exempt from CSRF) that hop was the request's only one."""
        own_async = getattr(getattr(method, "__self__", None), "aprocess_view", None)
        if is_async and own_async is not None and getattr(method, "__name__", "") == "process_view":
            return own_async
        return super().adapt_method_mode(is_async, method, *args, **kwargs)

    async def _request_started(self, scope: dict[str, Any]) -> None:
        if _loop_safe(signals.request_started, self.__class__):
            signals.request_started.send(sender=self.__class__, scope=scope)
        else:
            await signals.request_started.asend(sender=self.__class__, scope=scope)

    async def _close(self, response: Any) -> None:
        if not _worker_thread_started() and _loop_safe(signals.request_finished, self.__class__):
            response.close()
        else:
            await sync_to_async(response.close)()
