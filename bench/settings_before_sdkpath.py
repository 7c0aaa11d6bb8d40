"""The deployed settings with the /v1 path as it was before issue 13 item 5: the "before" of BENCHMARKS.md.

    python -m bench.run --only none --compare bench.settings_before_sdkpath

Puts back, in the server that loads these settings only, (1) the typed SDK call (`chat.completions.create`: a
request-body transform per call and a pydantic ChatCompletionChunk per chunk) and (2) Django's stock ASGIHandler
(request_started, CSRF's process_view and the response's close through a thread hop each, in a new worker thread
per request).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

from django.core.handlers.asgi import ASGIHandler
from django.core.handlers.base import BaseHandler

from agents.llm import providers
from agents.llm.types import ChatRequest, TextDelta, Usage
from aiwriter import asgi_handler
from aiwriter.settings import *  # noqa: F403


async def _typed_stream(self: Any, request: ChatRequest,
                        upstream_model: str) -> AsyncGenerator[TextDelta | Usage, None]:
    params = self.body(request, upstream_model)
    extra = {k: params.pop(k) for k in list(request.extra)} if request.extra else None
    if extra:
        params["extra_body"] = extra
    try:
        stream = await self.client.chat.completions.create(**params)
    except Exception as exc:  # noqa: BLE001
        raise providers.map_error(exc, self.api_key) from None
    usage: Usage | None = None
    try:
        async for chunk in stream:
            if chunk.choices:
                choice = chunk.choices[0]
                text = choice.delta.content if choice.delta is not None else None
                calls = choice.delta.tool_calls if choice.delta is not None else None
                pieces = [call.model_dump(exclude_none=True) for call in calls] if calls else None
                if text or pieces or choice.finish_reason:
                    yield TextDelta(text or "", finish_reason=choice.finish_reason, tool_calls=pieces)
            if chunk.usage is not None:
                details = getattr(chunk.usage, "prompt_tokens_details", None)
                usage = Usage(prompt_tokens=chunk.usage.prompt_tokens or 0,
                              completion_tokens=chunk.usage.completion_tokens or 0,
                              cached_prompt_tokens=(getattr(details, "cached_tokens", 0) or 0) if details else 0)
    except (asyncio.CancelledError, GeneratorExit):
        raise
    except Exception as exc:  # noqa: BLE001
        raise providers.map_error(exc, self.api_key) from None
    finally:
        try:
            await stream.close()
        except Exception:  # noqa: BLE001, S110
            pass
    if usage is not None:
        yield usage


providers.OpenAICompatibleProvider.stream = _typed_stream  # type: ignore[method-assign]
asgi_handler.LoopASGIHandler.__call__ = ASGIHandler.__call__  # type: ignore[method-assign]
asgi_handler.LoopASGIHandler.handle = ASGIHandler.handle  # type: ignore[method-assign, assignment]
asgi_handler.LoopASGIHandler.adapt_method_mode = BaseHandler.adapt_method_mode  # type: ignore[method-assign]
