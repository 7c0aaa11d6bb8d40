"""Provider adapters: each yields text deltas and finally a Usage (None when the upstream sent none)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

from django.conf import settings

from agents.llm import tokens
from agents.llm.types import BadUpstreamRequest, ChatRequest, LLMError, RateLimited, TextDelta, UpstreamTimeout, Usage


class DemoProvider:
    """Built-in provider that needs no key: streams a reply built from the prompt."""

    def __init__(self, chunk_delay: float | None = None):
        self.chunk_delay = settings.DEMO_CHUNK_DELAY_SECONDS if chunk_delay is None else chunk_delay

    @staticmethod
    def reply_for(messages: list[dict[str, Any]]) -> str:
        last_user = next((tokens.message_text(m.get("content")) for m in reversed(messages)
                          if m.get("role") == "user"), "")
        topic = " ".join(last_user.split()[:24]) or "your request"
        return (
            f"This is the demo model answering: \"{topic}\". "
            "In a real deployment an OpenAI-compatible provider writes this reply; "
            "the demo streams it in small pieces so you can watch metering, status updates and cancel work "
            "without any API key."
        )

    async def stream(self, request: ChatRequest, upstream_model: str) -> AsyncGenerator[TextDelta | Usage, None]:
        if request.tools:
            # Said plainly rather than answering in text as if no tools had been offered (docs/openai-compat.md).
            raise BadUpstreamRequest("The built-in demo provider does not support 'tools' (function calling); use a "
                                     "model served by an OpenAI-compatible provider.", code="unsupported_parameter")
        text = self.reply_for(request.messages)
        encoding = tokens.encoding_for(upstream_model)
        token_ids = encoding.encode_ordinary(text)
        if request.max_tokens:
            token_ids = token_ids[: request.max_tokens]
        for start in range(0, len(token_ids), 3):
            if self.chunk_delay:
                await asyncio.sleep(self.chunk_delay)
            yield TextDelta(encoding.decode(token_ids[start:start + 3]))
        yield Usage(prompt_tokens=tokens.count_messages(request.messages, upstream_model),
                    completion_tokens=len(token_ids), source="measured")


def redact(text: str, secret: str) -> str:
    """Upstream error messages sometimes quote the key they were given: never pass it on."""
    if secret and len(secret) >= 4:
        text = text.replace(secret, "***")
    return text[:500]


def map_error(exc: BaseException, api_key: str = "") -> LLMError:
    """openai SDK / transport exceptions → our LLMError family (retryable or not)."""
    import httpx2
    import openai

    message = redact(str(exc) or exc.__class__.__name__, api_key)
    if isinstance(exc, LLMError):
        return exc
    if isinstance(exc, openai.APITimeoutError | httpx2.TimeoutException | asyncio.TimeoutError):
        return UpstreamTimeout(f"Upstream timed out: {message}")
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        retry_after = _retry_after(exc.response.headers.get("retry-after")) if exc.response is not None else None
        if status == 429:
            return RateLimited(f"Upstream rate limited: {message}", retry_after=retry_after)
        if status >= 500 or status == 408:
            return LLMError(f"Upstream error {status}: {message}", code="upstream_error", retry_after=retry_after)
        if status in (401, 403, 404):
            # This deployment's misconfiguration: another deployment may serve (failover).
            return LLMError(f"Upstream refused the call ({status}): check the provider's key and upstream model.",
                            code="upstream_auth" if status != 404 else "upstream_model_not_found", failover=True)
        return BadUpstreamRequest(f"Upstream rejected the request ({status}): {message}")
    if isinstance(exc, openai.APIConnectionError | httpx2.TransportError | httpx2.StreamError | ConnectionError):
        return LLMError(f"Upstream connection failed: {message}", code="upstream_unavailable")
    if isinstance(exc, ValueError | openai.APIResponseValidationError):  # malformed SSE / JSON
        return LLMError(f"Upstream sent a malformed response: {message}", code="upstream_bad_response")
    if isinstance(exc, openai.APIError | httpx2.HTTPError):
        return LLMError(f"Upstream failed: {message}", code="upstream_error")
    raise exc


def _retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None


class OpenAICompatibleProvider:
    """Any OpenAI-compatible endpoint, through the official SDK with our base_url."""

    def __init__(self, *, base_url: str = "", api_key: str = "", timeout: float = 60.0,
                 client: Any = None) -> None:
        import openai

        self.api_key = api_key or ""
        # The SDK's default httpx transport. Its aiohttp one (openai[aiohttp]) measured ~5 % less server CPU per call
        # here, but raises a dropped connection before handing over what was already buffered (the text of a cut
        # stream, which we bill and keep) and reports a refused connection as a timeout: docs/BENCHMARKS.md.
        self.client = client or openai.AsyncOpenAI(base_url=base_url, api_key=api_key or "none",
                                                   timeout=timeout, max_retries=0)

    async def stream(self, request: ChatRequest, upstream_model: str) -> AsyncGenerator[TextDelta | Usage, None]:
        """Deltas, then Usage if the upstream reported it. Failures raise LLMError (see map_error)."""
        params: dict[str, Any] = {
            "model": upstream_model,
            "messages": request.messages,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        for name in ("temperature", "top_p", "max_tokens", "stop", "response_format", "user", "tools", "tool_choice",
                     "parallel_tool_calls"):
            value = getattr(request, name)
            if value is not None:
                params[name] = value
        if request.extra:
            params["extra_body"] = request.extra
        try:
            stream = await self.client.chat.completions.create(**params)
        except Exception as exc:  # noqa: BLE001 - mapped to LLMError or re-raised
            raise map_error(exc, self.api_key) from None
        usage: Usage | None = None
        try:
            async for chunk in stream:
                if chunk.choices:
                    choice = chunk.choices[0]
                    text = choice.delta.content if choice.delta is not None else None
                    calls = choice.delta.tool_calls if choice.delta is not None else None
                    pieces = [call.model_dump(exclude_none=True) for call in calls] if calls else None
                    if text or pieces or choice.finish_reason:  # the finish_reason rides on its own piece
                        yield TextDelta(text or "", finish_reason=choice.finish_reason, tool_calls=pieces)
                if chunk.usage is not None:
                    details = getattr(chunk.usage, "prompt_tokens_details", None)
                    usage = Usage(
                        prompt_tokens=chunk.usage.prompt_tokens or 0,
                        completion_tokens=chunk.usage.completion_tokens or 0,
                        cached_prompt_tokens=(getattr(details, "cached_tokens", 0) or 0) if details else 0,
                    )
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to LLMError or re-raised
            raise map_error(exc, self.api_key) from None
        finally:
            try:
                await stream.close()
            except Exception:  # noqa: BLE001, S110 - closing a dead connection may fail; nothing to do
                pass
        if usage is not None:
            yield usage
