"""Static files through WhiteNoise without forcing the middleware chain into sync mode.

WhiteNoiseMiddleware is sync-only. One sync-only middleware makes Django run the whole chain in its
single thread-sensitive worker thread and call the async views back through async_to_sync, so every
request holds that one thread from start to end: requests are served one at a time. Measured with
bench/ (docs/BENCHMARKS.md): that, not the view code, capped /v1 throughput.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.http import HttpRequest, HttpResponse
from whitenoise.middleware import WhiteNoiseMiddleware


class AsyncWhiteNoiseMiddleware(WhiteNoiseMiddleware):
    async_capable = True
    sync_capable = True

    def __init__(self, get_response: Any = None, *args: Any, **kwargs: Any) -> None:
        super().__init__(get_response, *args, **kwargs)
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)

    def __call__(self, request: Any) -> Any:
        if iscoroutinefunction(self):
            return self.__acall__(request)
        return super().__call__(request)

    async def __acall__(self, request: Any) -> Any:
        if self.autorefresh:
            static_file = await sync_to_async(self.find_file)(request.path_info)
        else:
            static_file = self.files.get(request.path_info)  # an in-memory dict: no I/O
        if static_file is not None:
            # Opening the file is blocking I/O: off the event loop.
            return await sync_to_async(self.serve, thread_sensitive=False)(static_file, request)
        return await self.get_response(request)


_FAVICON = Path(__file__).resolve().parent.parent / "static" / "favicon.ico"


@functools.cache
def _favicon_bytes() -> bytes:
    return _FAVICON.read_bytes()


async def favicon(request: HttpRequest) -> HttpResponse:
    """/favicon.ico, which browsers ask for on every page (the admin's too) whatever the <link rel=icon> says."""
    response = HttpResponse(_favicon_bytes(), content_type="image/x-icon")
    response["Cache-Control"] = "public, max-age=86400"
    return response
