"""OpenAI's response bodies and SSE chunks, and our extras as headers (never in the body)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any
from urllib.parse import quote

from django.http import StreamingHttpResponse

from agents.llm.types import ChatResult, TextDelta, Usage
from aiwriter.money import money_str

DONE = b"data: [DONE]\n\n"


def usage_body(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_prompt_tokens},
    }


def _served_headers(provider: str, fallback: bool, cache_hit: bool) -> dict[str, str]:
    return {
        "x-aiwriter-provider": quote(provider, safe=" -_.~:/@"),
        "x-aiwriter-fallback": "true" if fallback else "false",
        "x-aiwriter-cache": "hit" if cache_hit else "miss",
    }


def extras_headers(result: ChatResult, cost: Decimal) -> dict[str, str]:
    return {"x-aiwriter-cost": money_str(cost), **_served_headers(result.provider, result.fallback, result.cache_hit)}


def stream_extras_headers(first: TextDelta | ChatResult) -> dict[str, str]:
    """Our extras on a stream, sent with its first item (see docs/openai-compat.md). Who serves it is settled
    then: nothing is retried nor falls back once text reached the client. The cost is known only at the end."""
    headers = {"x-aiwriter-cost": "pending"}
    if isinstance(first, ChatResult):  # a reply without any text: the call is over already
        headers.update(_served_headers(first.provider, first.fallback, first.cache_hit))
    elif first.served is not None:
        headers.update(_served_headers(first.served.provider, first.served.fallback, first.served.cache_hit))
    return headers


class EventStreamResponse(StreamingHttpResponse):
    """An SSE response that closes its async generator as soon as Django stops sending.

    Django's ASGI handler closes only the outer iterator when the client disconnects while a chunk
    is being sent; the generator behind it would then run its cleanup (which closes and bills the
    metered stream) only whenever it is garbage-collected. Closing it here makes that deterministic.
    """

    def __init__(self, events: AsyncIterator[bytes]):
        super().__init__(events, content_type="text/event-stream")
        self["Cache-Control"] = "no-cache"
        self["X-Accel-Buffering"] = "no"  # a proxy in front (nginx) must not buffer the stream either

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for part in self.streaming_content:
                yield part
        finally:
            await self._iterator.aclose()


def message_body(result: ChatResult) -> dict[str, Any]:
    """The assistant message; with function calls its content is null when the model wrote no text, as OpenAI's."""
    if not result.tool_calls:
        return {"role": "assistant", "content": result.content, "refusal": None}
    return {"role": "assistant", "content": result.content or None, "refusal": None, "tool_calls": result.tool_calls}


@dataclass
class Completion:
    """The id, creation time and model name shared by every chunk of one response."""

    model: str
    include_usage: bool = False
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    def body(self, result: ChatResult) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [{
                "index": 0,
                "message": message_body(result),
                "logprobs": None,
                "finish_reason": result.finish_reason or "stop",
            }],
            "usage": usage_body(result.usage),
        }

    def _event(self, data: dict[str, Any]) -> bytes:
        return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        data: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }
        if self.include_usage:
            data["usage"] = None  # as OpenAI does: null on every chunk but the last
        return self._event(data)

    def usage_chunk(self, usage: Usage) -> bytes:
        return self._event({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [],
            "usage": usage_body(usage),
        })


def model_list(names: list[tuple[str, Any]]) -> dict[str, Any]:
    return {"object": "list", "data": [model_object(name, created) for name, created in names]}


def model_object(name: str, created: Any) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": int(created.timestamp()) if created else 0,
            "owned_by": "aiwriter"}
