"""Provider adapters: each yields text deltas and finally a Usage (None when the upstream sent none)."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Any

from django.conf import settings

from agents.llm import sse, tokens
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


# What the SDK's own stream allows for the end of the body after [DONE].
_DRAIN_SECONDS = 0.1


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
    """Any OpenAI-compatible endpoint, through the official SDK with our base_url.

    The SDK's client holds the base_url, key, timeouts and connection pool; its HTTP client sends the call, with the
    request's URL, headers and timeout built once per client (`_Wire`), and its status errors are the SDK's own. We
    read the events as plain dicts (agents/llm/sse.py). The typed `chat.completions.create` cost a request-body
    transform per call and pydantic objects per chunk (about a third of the server's CPU for a /v1 call), and the
    SDK's `post` another ~8 % in options, header merging and URL parsing per call (docs/BENCHMARKS.md)."""

    def __init__(self, *, base_url: str = "", api_key: str = "", timeout: float = 60.0,
                 client: Any = None) -> None:
        import openai

        self.api_key = api_key or ""
        # The SDK's default httpx transport. Its aiohttp one (openai[aiohttp]) measured ~5 % less server CPU per call
        # here, but raises a dropped connection before handing over what was already buffered (the text of a cut
        # stream, which we bill and keep) and reports a refused connection as a timeout: docs/BENCHMARKS.md.
        self.client = client or openai.AsyncOpenAI(base_url=base_url, api_key=api_key or "none",
                                                   timeout=timeout, max_retries=0)
        self._wire: _Wire | None = None

    @staticmethod
    def body(request: ChatRequest, upstream_model: str) -> dict[str, Any]:
        """The JSON body: the request's fields that are set, then its extra fields over them (as `extra_body`)."""
        body: dict[str, Any] = {
            "model": upstream_model,
            "messages": request.messages,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        for name in ("temperature", "top_p", "max_tokens", "stop", "response_format", "user", "tools", "tool_choice",
                     "parallel_tool_calls"):
            value = getattr(request, name)
            if value is not None:
                body[name] = value
        if request.extra:
            body.update(request.extra)
        return body

    async def stream(self, request: ChatRequest, upstream_model: str) -> AsyncGenerator[TextDelta | Usage, None]:
        """Deltas, then Usage if the upstream reported it. Failures raise LLMError (see map_error)."""
        if self._wire is None:
            self._wire = _Wire(self.client)
        try:
            response = await self._wire.send(self.body(request, upstream_model))
        except Exception as exc:  # noqa: BLE001 - mapped to LLMError or re-raised
            raise map_error(exc, self.api_key) from None
        usage: Usage | None = None
        chunks = response.aiter_bytes()
        done = False
        try:
            async with aclosing(sse.events(chunks)) as events:
                async for data in events:
                    if data.startswith(sse.DONE):
                        done = True
                        break
                    chunk = sse.decode(data)
                    if chunk.get("error"):
                        raise _stream_error(chunk["error"], response)
                    try:
                        delta, reported = _delta(chunk), _usage(chunk)
                    except (AttributeError, TypeError, KeyError) as exc:  # a field of an unexpected type
                        raise ValueError(f"unexpected chunk: {exc}") from None
                    if delta is not None:
                        yield delta
                    usage = reported or usage
            if done:
                await _drain(chunks)
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to LLMError or re-raised
            raise map_error(_as_sdk_error(exc, response), self.api_key) from None
        finally:
            try:
                await response.aclose()
            except Exception:  # noqa: BLE001, S110 - closing a dead connection may fail; nothing to do
                pass
        if usage is not None:
            yield usage


class _Wire:
    """The SDK's `post` for our one call, minus its per-call work: the URL, headers and timeout are the SDK client's
    own (its default and auth headers), computed once; the errors are those `post` raises (status errors through
    the SDK's own mapping, a timeout as APITimeoutError, a failed connection as APIConnectionError)."""

    def __init__(self, client: Any) -> None:
        import httpx2
        import openai

        self.client = client
        self.url = httpx2.URL(str(client.base_url).rstrip("/") + "/chat/completions")
        headers = {k: v for k, v in client.default_headers.items() if not isinstance(v, openai.Omit)}
        self.headers = {**headers, **client.auth_headers}
        timeout = client.timeout if isinstance(client.timeout, httpx2.Timeout) else httpx2.Timeout(client.timeout)
        self.extensions = {"timeout": timeout.as_dict()}

    async def send(self, body: dict[str, Any]) -> Any:
        import httpx2
        import openai

        request = httpx2.Request("POST", self.url, headers=self.headers, content=json.dumps(body).encode(),
                                 extensions=self.extensions)
        try:
            response = await self.client._client.send(request, stream=True)
        except httpx2.TimeoutException:
            raise openai.APITimeoutError(request=request) from None
        except Exception as exc:
            raise openai.APIConnectionError(request=request) from exc
        if response.status_code >= 400:
            try:
                await response.aread()
            finally:
                await response.aclose()
            raise self.client._make_status_error_from_response(response)
        return response


def _delta(chunk: dict[str, Any]) -> TextDelta | None:
    """The chunk's first choice as a TextDelta; None when it carries no text, function call nor finish_reason."""
    choices = chunk.get("choices")
    if not choices:
        return None
    choice = choices[0]
    delta = choice.get("delta") or {}
    text = delta.get("content")
    calls = delta.get("tool_calls")
    # Unset fields left out, as the SDK's model_dump(exclude_none=True) did.
    pieces = [_without_none(call) for call in calls] if calls else None
    finish_reason = choice.get("finish_reason")
    if not (text or pieces or finish_reason):  # the finish_reason rides on its own piece
        return None
    return TextDelta(text or "", finish_reason=finish_reason, tool_calls=pieces)


def _usage(chunk: dict[str, Any]) -> Usage | None:
    """The usage the chunk reports (the last one, with stream_options.include_usage), else None."""
    reported = chunk.get("usage")
    if not reported:
        return None
    details = reported.get("prompt_tokens_details") or {}
    return Usage(prompt_tokens=reported.get("prompt_tokens") or 0,
                 completion_tokens=reported.get("completion_tokens") or 0,
                 cached_prompt_tokens=details.get("cached_tokens") or 0)


def _without_none(value: dict[str, Any]) -> dict[str, Any]:
    return {k: _without_none(v) if isinstance(v, dict) else v for k, v in value.items() if v is not None}


async def _drain(chunks: AsyncIterator[bytes]) -> None:
    """Reads what follows [DONE] (the body's end) so HTTP/1.1 can reuse the connection, briefly, as the SDK does."""
    try:
        async with asyncio.timeout(_DRAIN_SECONDS):
            async for _ in chunks:
                pass
    except Exception:  # noqa: BLE001, S110 - the reply is complete; the connection is then closed, not reused
        pass


def _stream_error(error: Any, response: Any) -> Exception:
    """An `{"error": ...}` event inside the stream: the SDK's APIError, with the upstream's message."""
    import openai

    message = error.get("message") if isinstance(error, dict) else None
    if not message or not isinstance(message, str):
        message = "An error occurred during streaming"
    return openai.APIError(message, response.request, body=error)


def _as_sdk_error(exc: Exception, response: Any) -> Exception:
    """A transport failure mid-stream as the SDK's stream raised it (timeout / connection error)."""
    import anyio
    import httpx2
    import openai

    if isinstance(exc, httpx2.TimeoutException):
        return openai.APITimeoutError(request=response.request)
    if isinstance(exc, httpx2.RequestError | ssl.SSLError | anyio.EndOfStream):
        return openai.APIConnectionError(request=response.request)
    return exc
