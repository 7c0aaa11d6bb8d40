"""Generating a reply: one metered model call per exchange, streamed as frames, ended in a final state.

`run_exchange` is shared by REST (no emitter; it returns the finished reply) and the websocket (frames
go to the conversation's channel-layer group). Whatever happens — success, no credit, model failure,
cancel, client disconnect, a bug — the reply ends with a final status and the text that arrived, and
the conversation's lock is released.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

from asgiref.sync import sync_to_async

from agents.llm import tokens
from agents.llm.types import ChatRequest, ChatResult, LLMError, TextDelta
from agents.openai_compat import keylimits
from aiwriter.errors import ApiError
from conversations import hotpath, prompt, services
from conversations.models import Message
from conversations.services import Exchange
from usage.metering import CallContext, MeteredResult, metered_stream

logger = logging.getLogger(__name__)

# Plain sync_to_async, not channels' database_sync_to_async: this also runs inside REST requests, where
# closing "old" connections mid-request would drop the request's own connection.
Emit = Callable[[dict[str, Any]], Awaitable[None]]

# Streamed text is checkpointed (and the lock extended) this often, so a crashed worker's reply keeps
# most of what arrived and a long reply never outlives its lock.
CHECKPOINT_SECONDS = 2.0

CANCELLED_TEXT = "Stopped before the reply was complete."


async def _no_emit(frame: dict[str, Any]) -> None:
    return None


def status_frame(exchange: Exchange, status: str) -> dict[str, Any]:
    return {"type": "status", "status": status, "conversation": exchange.conversation.pk,
            "message": exchange.reply.pk}


def error_frame(code: str, text: str, retryable: bool, message_id: int | None = None,
                retry_after: int | None = None) -> dict[str, Any]:
    """`message` when a reply exists; `retry_after` (seconds, as the HTTP Retry-After) when it is known."""
    frame: dict[str, Any] = {"type": "error"}
    if message_id is not None:
        frame["message"] = message_id
    frame.update(code=code, message_text=text, retryable=retryable)
    if retry_after is not None:
        frame["retry_after"] = retry_after
    return frame


def done_frame(reply: Message) -> dict[str, Any]:
    return {
        "type": "done", "message": reply.pk, "status": reply.status,
        "usage": {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                  "total_tokens": reply.prompt_tokens + reply.completion_tokens,
                  "estimated": reply.usage_estimated},
        "cost": str(reply.cost), "model": reply.model_name, "fallback": reply.fallback,
    }


# Telling a failed reply again (a replayed client_id): its status gives the default code, HTTP status and
# retryability; the code stored with the reply (what the client was told the first time) refines them.
_STATUS_CODES = {
    Message.Status.INSUFFICIENT_BALANCE: ("insufficient_balance", 402, False),
    Message.Status.CONTENT_VIOLATION: ("content_violation", 422, False),
    Message.Status.LLM_ERROR: ("llm_error", 502, True),
    Message.Status.ERROR: ("interrupted", 503, True),
}
_CODE_OUTCOMES = {  # code: (HTTP status, retryable), where they differ from the status's default
    "quota_exceeded": (429, False), "key_budget_exceeded": (429, False),
    "upstream_timeout": (504, True), "rate_limited": (429, True), "no_healthy_deployment": (503, True),
    "bad_request": (502, False), "model_not_found": (502, False), "upstream_auth": (502, False),
    "upstream_model_not_found": (502, False),
}


def _outcome(reply: Message) -> tuple[str, int, bool]:
    code, http_status, retryable = _STATUS_CODES.get(reply.status, ("interrupted", 503, True))
    if reply.error_code:
        code = reply.error_code
        http_status, retryable = _CODE_OUTCOMES.get(code, (http_status, retryable))
    return code, http_status, retryable


def outcome_frame(reply: Message) -> dict[str, Any]:
    """The final frame for a reply already in its final state."""
    if reply.status == Message.Status.SUCCESS:
        return done_frame(reply)
    code, _, retryable = _outcome(reply)
    return error_frame(code, reply.error_message or "The reply failed.", retryable, reply.pk)


def outcome_error(reply: Message) -> ApiError | None:
    """The API error for a failed reply (None for success), carrying the reply's id."""
    if reply.status == Message.Status.SUCCESS:
        return None
    code, http_status, retryable = _outcome(reply)
    return _api_error(code, reply.error_message or "The reply failed.", http_status, retryable, reply)


def _api_error(code: str, text: str, http_status: int, retryable: bool, reply: Message) -> ApiError:
    return ApiError(text, code=code, status_code=http_status, retryable=retryable,
                    extra={"message_id": reply.pk, "status": reply.status})


def _estimate(request: ChatRequest | None, content: str) -> tuple[int, int]:
    if request is None:
        return 0, tokens.count_text(content)
    return tokens.count_messages(request.messages, request.model), tokens.count_text(content, request.model)


async def run_exchange(exchange: Exchange, *, user: Any, entry_point: str, api_key: Any = None,
                       emit: Emit | None = None) -> Message:
    """Generates the reply of a begun exchange; returns it in its final state. Re-raises cancellation."""
    emit = emit or _no_emit
    finish = hotpath.finish_reply  # one statement on the async pool (PostgreSQL), else services.finish_reply
    reply = exchange.reply
    if exchange.finished:  # replay or rejected by moderation: only the outcome to tell
        await emit(outcome_frame(reply))
        return reply

    parts: list[str] = []
    request: ChatRequest | None = None
    stream = None
    ctx: CallContext | None = None
    started = time.monotonic()
    try:
        await emit(status_frame(exchange, "thinking"))
        request = await sync_to_async(prompt.build_request)(
            conversation=exchange.conversation, user_message=exchange.user_message, user=user, api_key=api_key)
        ctx = CallContext(user=user, entry_point=entry_point, api_key=api_key, project=exchange.conversation.project,
                          agent=exchange.conversation.agent, conversation=exchange.conversation, message=reply)
        metered: MeteredResult | None = None
        last_checkpoint = time.monotonic()
        stream = metered_stream(ctx, request)
        async for item in stream:
            if isinstance(item, MeteredResult):
                metered = item
            elif isinstance(item, TextDelta) and item.content:
                if not parts:
                    await emit(status_frame(exchange, "generating"))
                parts.append(item.content)
                await emit({"type": "delta", "message": reply.pk, "content": item.content})
                if time.monotonic() - last_checkpoint > CHECKPOINT_SECONDS:
                    last_checkpoint = time.monotonic()
                    await sync_to_async(services.checkpoint)(exchange, "".join(parts))
        if metered is None:
            raise LLMError("The model stream ended without a result.", code="llm_error")
        result: ChatResult = metered.result
        await finish(exchange, status=Message.Status.SUCCESS, content=result.content or "".join(parts),
                     model_name=result.model, provider_name=result.provider,
                     prompt_tokens=result.usage.prompt_tokens, completion_tokens=result.usage.completion_tokens,
                     usage_estimated=result.usage.estimated, fallback=result.fallback,
                     latency_ms=result.latency_ms, cost=metered.cost)
        await emit(done_frame(reply))
    except ApiError as exc:
        # InsufficientBalance / QuotaExceeded / KeyBudgetExceeded: raised before the model is called.
        await finish(exchange, status=Message.Status.INSUFFICIENT_BALANCE, error_message=exc.message,
                     error_code=exc.code)
        exchange.extra["error"] = _api_error(exc.code, exc.message, exc.status_code, exc.retryable, reply)
        await emit(error_frame(exc.code, exc.message, exc.retryable, reply.pk))
    except LLMError as exc:
        partial = exc.partial
        content = partial.content if partial is not None and partial.content else "".join(parts)
        if partial is not None:
            usage = partial.usage
            fields = dict(model_name=partial.model, provider_name=partial.provider,
                          prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                          usage_estimated=usage.estimated, fallback=partial.fallback, latency_ms=partial.latency_ms)
        else:
            prompt_tokens, completion_tokens = _estimate(request, content)
            fields = dict(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, usage_estimated=True,
                          latency_ms=int((time.monotonic() - started) * 1000))
        record = getattr(exc, "usage_record", None)
        cost = getattr(record, "cost", None) or Decimal("0")
        await finish(exchange, status=Message.Status.LLM_ERROR, content=content, error_message=exc.message,
                     error_code=exc.code, cost=cost, **fields)
        # The upstream refusing our request (4xx) is not the client's mistake: 502 for those.
        http_status = exc.http_status if exc.http_status in (429, 502, 503, 504) else 502
        exchange.extra["error"] = _api_error(exc.code, exc.message, http_status, exc.retryable, reply)
        await emit(error_frame(exc.code, exc.message, exc.retryable, reply.pk))
    except asyncio.CancelledError:
        # Cancel frame or client disconnect: close the model stream (metering records it as partial),
        # keep the text that arrived, then let the cancellation go on.
        await _close(stream)
        content = "".join(parts)
        prompt_tokens, completion_tokens = _estimate(request, content)
        record = ctx.usage_record if ctx is not None else None
        await finish(exchange, status=Message.Status.ERROR, content=content, error_message=CANCELLED_TEXT,
                     error_code="cancelled", prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     usage_estimated=True, latency_ms=int((time.monotonic() - started) * 1000),
                     cost=record.cost if record is not None and record.charged else Decimal("0"))
        await _emit_quietly(emit, error_frame("cancelled", CANCELLED_TEXT, True, reply.pk))
        raise
    except Exception:  # noqa: BLE001 - a bug must still leave a final state and a free lock
        logger.exception("reply %s failed", reply.pk)
        await _close(stream)
        await finish(exchange, status=Message.Status.ERROR, content="".join(parts), error_code="internal_error",
                     error_message="Internal error while generating the reply.")
        await _emit_quietly(emit, error_frame("internal_error", "Internal error while generating the reply.",
                                              True, reply.pk))
    finally:
        await hotpath.release_lock(exchange)  # async Redis / the pool: no thread hop
        await _record_key_tokens(api_key, reply)
    return reply


async def _record_key_tokens(api_key: Any, reply: Message) -> None:
    """The tokens the reply used (real or estimated) count against the API key's tokens per minute."""
    if not getattr(api_key, "tpm", None):
        return
    try:
        await keylimits.record_tokens(api_key, reply.prompt_tokens + reply.completion_tokens)
    except Exception:  # noqa: BLE001 - the reply is stored; a lost count only loosens the limit
        logger.exception("could not record the key's tokens for reply %s", reply.pk)


async def _close(stream) -> None:
    if stream is None:
        return
    try:
        await stream.aclose()
    except Exception:  # noqa: BLE001 - closing is best effort; metering logs its own failures
        logger.exception("closing the model stream failed")


async def _emit_quietly(emit: Emit, frame: dict[str, Any]) -> None:
    try:
        await emit(frame)
    except Exception:  # noqa: BLE001 - the client may be gone; the stored message is what counts
        logger.debug("could not emit %s", frame.get("type"))
