"""The OpenAI-compatible endpoint: POST /v1/chat/completions, GET /v1/models[/<id>].

Plain async views (not DRF) so a stream is an async generator that daphne flushes chunk by chunk.
Bearer key only, so no CSRF. Every error leaves as OpenAI's error shape (errors.py).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.db import InterfaceError, OperationalError
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from agents.llm.types import LLMError, ModelNotFound, TextDelta
from aiwriter.db import released
from aiwriter.errors import ApiError
from aiwriter.observability import timing
from openai_compat import calls, errors, hotcache, parsing, responses, targets
from usage import pipeline
from usage.authentication import bearer_token, resolve_api_key
from usage.metering import MeteredResult
from usage.models import ApiKey

logger = logging.getLogger(__name__)

View = Callable[..., Awaitable[HttpResponse]]


def openai_view(method: str) -> Callable[[View], View]:
    """Allows one method, authenticates the bearer key (request.api_key) and renders errors OpenAI's way."""

    def decorate(view: View) -> View:
        @csrf_exempt
        @functools.wraps(view)
        async def wrapper(request: HttpRequest, *args, **kwargs) -> HttpResponse:
            try:
                if request.method != method:
                    raise errors.OpenAIError(f"Method {request.method} is not allowed here.", status=405,
                                             code="method_not_allowed")
                request.api_key = await _authenticate(request)
                return await view(request, *args, **kwargs)
            except (errors.OpenAIError, ApiError, LLMError) as exc:
                return errors.to_openai_error(exc).response()
            except (OperationalError, InterfaceError):
                logger.warning("database unavailable on %s", request.path)
                return errors.OpenAIError("The database is unavailable; try again.", status=503,
                                          type="server_error", code="database_unavailable").response()
            except Exception:
                # A bug: still answer in OpenAI's shape, so the SDK raises InternalServerError with our message.
                logger.exception("unhandled error on %s", request.path)
                return errors.internal_error().response()

        return wrapper

    return decorate


async def _authenticate(request: HttpRequest) -> ApiKey:
    raw = bearer_token(request.headers.get("Authorization", ""))
    if not raw:
        raise errors.invalid_api_key()
    with timing("auth"):
        api_key = hotcache.get_key(raw)  # on the loop: no query, no thread hop
        if api_key is None:
            api_key = await sync_to_async(released(resolve_api_key))(raw)  # no pooled connection kept after
            if api_key is None:
                raise errors.invalid_api_key()
            hotcache.put_key(raw, api_key)
    return api_key


def _body(request: HttpRequest) -> bytes:
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    too_big = errors.OpenAIError(f"The request body is larger than {limit} bytes.", status=413,
                                 code="request_too_large")
    try:
        body = request.body
    except RequestDataTooBig:
        raise too_big from None
    if limit is not None and len(body) > limit:  # a chunked body has no Content-Length to check first
        raise too_big
    return body


@openai_view("POST")
async def chat_completions(request: HttpRequest) -> HttpResponse:
    api_key: ApiKey = request.api_key
    params = parsing.parse_body(_body(request))
    try:
        call = await calls.prepare_call(account=api_key.user, api_key=api_key, model_name=params.model,
                                        messages=params.messages, entry_point="openai",
                                        max_tokens=params.max_tokens, options=params.options)
    except ModelNotFound:
        raise errors.model_not_found(params.model) from None
    completion = responses.Completion(model=params.model, include_usage=params.include_usage)
    if params.stream:
        return await _stream(call, completion)
    metered = await pipeline.run_complete(call)
    return JsonResponse(completion.body(metered.result), headers=responses.extras_headers(metered.result,
                                                                                          metered.cost))


async def _stream(call: calls.PreparedCall, completion: responses.Completion) -> HttpResponse:
    stream = pipeline.run_stream(call)
    # Wait for the first item before answering: balance, quota and upstream errors that come before
    # any text then get their real HTTP status instead of an error event inside a 200 stream.
    try:
        first = await anext(stream)
    except BaseException as exc:
        await stream.aclose()
        if isinstance(exc, LLMError):
            await calls.finish_call(call, exc.partial)
        elif isinstance(exc, ApiError):
            await calls.refused_call(call)
        raise
    response = responses.EventStreamResponse(_events(call, completion, stream, first))
    served = first.result if isinstance(first, MeteredResult) else first
    for name, value in responses.stream_extras_headers(served).items():
        response[name] = value
    return response


async def _events(call: calls.PreparedCall, completion: responses.Completion,
                  stream: AsyncIterator[TextDelta | MeteredResult], first: TextDelta | MeteredResult,
                  ) -> AsyncIterator[bytes]:
    delivered: list[str] = []
    final: MeteredResult | None = None
    try:
        yield completion.chunk({"role": "assistant", "content": ""})
        item: TextDelta | MeteredResult | None = first
        while item is not None:
            if isinstance(item, MeteredResult):
                final = item
                break
            if item.content:
                delivered.append(item.content)
                yield completion.chunk({"content": item.content})
            if item.tool_calls:  # function-call pieces, passed on as the upstream streamed them
                delivered.extend(c.get("function", {}).get("arguments", "") for c in item.tool_calls)
                yield completion.chunk({"tool_calls": item.tool_calls})
            item = await anext(stream, None)
        yield completion.chunk({}, finish_reason=(final.result.finish_reason if final else None) or "stop")
        if completion.include_usage and final is not None:
            yield completion.usage_chunk(final.result.usage)
        yield responses.DONE
    except (ApiError, LLMError) as exc:
        # Headers are gone: the error travels as an event, which the SDK raises as APIError.
        yield errors.to_openai_error(exc).sse_event()
    finally:
        # A client that hangs up lands here (GeneratorExit or CancelledError): closing the metered
        # stream makes metering record the call as partial, charged for what was generated.
        await stream.aclose()
        await calls.finish_call(call, final.result if final else None, "".join(delivered))


@openai_view("GET")
async def list_models(request: HttpRequest) -> HttpResponse:
    names = await sync_to_async(targets.usable_names)(request.api_key)
    return JsonResponse(responses.model_list(names))


@openai_view("GET")
async def retrieve_model(request: HttpRequest, model_id: str) -> HttpResponse:
    try:
        target = await sync_to_async(targets.resolve_target)(model_id, request.api_key)
    except ModelNotFound:
        raise errors.model_not_found(model_id) from None
    created = target.agent.created_at if target.agent else target.model.created_at
    return JsonResponse(responses.model_object(model_id, created))


@csrf_exempt
async def unknown_path(request: HttpRequest, path: str = "") -> HttpResponse:
    """Any other /v1 path (embeddings, images, …): OpenAI's own answer to an unknown URL, in its shape."""
    return errors.OpenAIError(f"Invalid URL ({request.method} {request.path})", status=404).response()
