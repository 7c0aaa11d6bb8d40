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
from django.conf import settings
from django.db import Error as DatabaseError
from django.db import InterfaceError, OperationalError

from agents.llm import errors as llm_errors
from agents.llm import tokens
from agents.llm.types import ChatRequest, ChatResult, LLMError, TextDelta
from aiwriter import deferred
from aiwriter.db import released
from aiwriter.errors import ApiError
from aiwriter.money import money_str
from conversations import hotpath, prompt, services
from conversations.models import Message
from conversations.services import Exchange
from usage import keylimits, pipeline
from usage.metering import CallContext, MeteredResult
from usage.models import UsageRecord

logger = logging.getLogger(__name__)

# Plain sync_to_async, not channels' database_sync_to_async: this also runs inside REST requests, where
# closing "old" connections mid-request would drop the request's own connection.
Emit = Callable[[dict[str, Any]], Awaitable[None]]

# The heartbeat: streamed text is checkpointed and the lease (lock, slot) renewed this often (or three times per
# CONVERSATION_LOCK_SECONDS if that is shorter), so a crashed worker's reply keeps most of what arrived and a
# live generation never outlives its lease, while a dead one frees it within CONVERSATION_LOCK_SECONDS.
CHECKPOINT_SECONDS = 2.0
# How long a reply's end waits for a checkpoint in flight when the heartbeat stops.
HEARTBEAT_STOP_SECONDS = 1.0

# The final frame waits at most this long for the reply's final write (a hung database never holds it back).
FINAL_FRAME_WAIT_SECONDS = 1.0

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
        "cost": money_str(reply.cost), "model": reply.model_name, "fallback": reply.fallback,
    }


# Telling a failed reply again (a replayed client_id): its status gives the default code, HTTP status and
# retryability; the code stored with the reply (what the client was told the first time) refines them.
_STATUS_CODES = {
    Message.Status.INSUFFICIENT_BALANCE: ("insufficient_balance", 402, False),
    Message.Status.CONTENT_VIOLATION: ("content_violation", 422, False),
    Message.Status.LLM_ERROR: ("llm_error", 502, True),
    Message.Status.ERROR: ("interrupted", 503, True),
}
# Refusals before the model is called (ApiErrors), where they differ from the status's default. A model
# failure's code is looked up in the one table of LLMError codes (agents/llm/errors.py).
_API_CODE_OUTCOMES = {"quota_exceeded": (429, False), "key_budget_exceeded": (429, False),
                      "context_length_exceeded": (400, False)}


def llm_outcome(code: str) -> tuple[int, bool]:
    """A model failure's HTTP status and retryability in chat (REST, replays, websocket frames)."""
    spec = llm_errors.spec(code)
    return spec.chat_status, spec.retryable


def _outcome(reply: Message) -> tuple[str, int, bool]:
    code, http_status, retryable = _STATUS_CODES.get(reply.status, ("interrupted", 503, True))
    if reply.error_code:
        code = reply.error_code
        if code in llm_errors.LLM_ERRORS:
            http_status, retryable = llm_outcome(code)
        else:
            http_status, retryable = _API_CODE_OUTCOMES.get(code, (http_status, retryable))
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


def usage_fields(record: UsageRecord) -> dict[str, Any]:
    """A reply's tokens, estimated flag and cost, as its usage record has them: the record is what was billed,
    so the message never tells another count (one source instead of one computation per outcome)."""
    return dict(prompt_tokens=record.prompt_tokens, completion_tokens=record.completion_tokens,
                usage_estimated=record.token_source != UsageRecord.TokenSource.MEASURED, cost=record.cost)


def _estimate(request: ChatRequest | None, content: str) -> tuple[int, int]:
    if request is None:
        return 0, tokens.count_text(content)
    return tokens.count_messages(request.messages, request.model), tokens.count_text(content, request.model)


async def run_exchange(exchange: Exchange, *, user: Any, entry_point: str, api_key: Any = None,
                       emit: Emit | None = None) -> Message:
    """Generates the reply of a begun exchange; returns it in its final state. Re-raises cancellation.

    Whatever fails, exactly one final frame (`done` or `error`) is emitted, and it never depends on the final
    database write: a database outage can delay that write (retried in the background, `aiwriter.deferred`), never
    the frame (`_end`). While it runs, a heartbeat renews the generation's lease (lock, slot) and checkpoints its
    text; a failed heartbeat is logged and the stream goes on.
    """
    emit = emit or _no_emit
    reply = exchange.reply
    if exchange.finished:  # replay or rejected by moderation: only the outcome to tell
        await emit(outcome_frame(reply))
        return reply

    parts: list[str] = []
    request: ChatRequest | None = None
    stream = None
    call: pipeline.PreparedCall | None = None
    ctx: CallContext | None = None
    started = time.monotonic()
    heartbeat = _Heartbeat(exchange, parts)
    cancelled: asyncio.CancelledError | None = None
    try:
        try:
            await emit(status_frame(exchange, "thinking"))
            # The request is chat's own (history trimmed to the window, memory; built on the event loop where the
            # async pool is); the key's limits were taken when the exchange began (its hold is the call's); the
            # call goes through the one pipeline: prepare → metered run → finish (in `finally`).
            built = await prompt.build_prompt_async(conversation=exchange.conversation,
                                                    user_message=exchange.user_message, user=user, api_key=api_key,
                                                    prefetched=exchange.extra.get("prompt"))
            request = built.request
            call = pipeline.prepare_request(
                built.target, request, account=user, api_key=api_key, entry_point=entry_point,
                project=exchange.conversation.project, hold=exchange.extra.get("key_hold"),
                prompt_tokens=built.prompt_tokens, conversation=exchange.conversation, message=reply)
            ctx = call.ctx
            metered: MeteredResult | None = None
            stream = pipeline.run_stream(call)
            async for item in stream:
                if isinstance(item, MeteredResult):
                    metered = item
                elif isinstance(item, TextDelta) and item.content:
                    if not parts:
                        await emit(status_frame(exchange, "generating"))
                    parts.append(item.content)
                    await emit({"type": "delta", "message": reply.pk, "content": item.content})
            if metered is None:
                raise LLMError("The model stream ended without a result.", code="llm_error")
            result: ChatResult = metered.result
            values = dict(status=Message.Status.SUCCESS, content=result.content or "".join(parts),
                          model_name=result.model, provider_name=result.provider,
                          fallback=result.fallback, latency_ms=result.latency_ms, **usage_fields(metered.record))
            _apply(reply, values)
            final = done_frame(reply)
        except pipeline.ContextLengthExceeded as exc:
            # The new message alone (with the system prompt) overflows the model's window: refused before the call.
            values = dict(status=Message.Status.LLM_ERROR, error_message=exc.message, error_code=exc.code)
            _apply(reply, values)
            http_status, retryable = _API_CODE_OUTCOMES[exc.code]
            exchange.extra["error"] = _api_error(exc.code, exc.message, http_status, retryable, reply)
            final = error_frame(exc.code, exc.message, retryable, reply.pk)
        except ApiError as exc:
            # InsufficientBalance / QuotaExceeded / KeyBudgetExceeded: raised before the model is called.
            values = dict(status=Message.Status.INSUFFICIENT_BALANCE, error_message=exc.message, error_code=exc.code)
            _apply(reply, values)
            exchange.extra["error"] = _api_error(exc.code, exc.message, exc.status_code, exc.retryable, reply)
            final = error_frame(exc.code, exc.message, exc.retryable, reply.pk)
        except LLMError as exc:
            partial = exc.partial
            content = partial.content if partial is not None and partial.content else "".join(parts)
            if partial is not None:
                usage = partial.usage
                fields = dict(model_name=partial.model, provider_name=partial.provider,
                              prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                              usage_estimated=usage.estimated, fallback=partial.fallback,
                              latency_ms=partial.latency_ms)
            else:
                prompt_tokens, completion_tokens = _estimate(request, content)
                fields = dict(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, usage_estimated=True,
                              latency_ms=int((time.monotonic() - started) * 1000))
            record = exc.usage_record
            if record is not None:
                fields.update(usage_fields(record))
            else:
                fields["cost"] = Decimal("0")
            values = dict(status=Message.Status.LLM_ERROR, content=content, error_message=exc.message,
                          error_code=exc.code, **fields)
            _apply(reply, values)
            http_status, retryable = llm_outcome(exc.code)
            exchange.extra["error"] = _api_error(exc.code, exc.message, http_status, retryable, reply)
            final = error_frame(exc.code, exc.message, retryable, reply.pk)
        except asyncio.CancelledError as exc:
            # Cancel frame or client disconnect: close the model stream (metering records it as partial),
            # keep the text that arrived, then let the cancellation go on.
            cancelled = exc
            await _close(stream)
            content = "".join(parts)
            record = ctx.usage_record if ctx is not None else None
            if record is not None:
                counted = usage_fields(record)
            else:  # cancelled before metering recorded anything (e.g. while the prompt was built)
                prompt_tokens, completion_tokens = _estimate(request, content)
                counted = dict(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                               usage_estimated=True, cost=Decimal("0"))
            values = dict(status=Message.Status.ERROR, content=content, error_message=CANCELLED_TEXT,
                          error_code="cancelled", latency_ms=int((time.monotonic() - started) * 1000), **counted)
            final = error_frame("cancelled", CANCELLED_TEXT, True, reply.pk)
        except Exception as exc:  # noqa: BLE001 - a bug or a lost database must still end the exchange
            await _close(stream)
            if isinstance(exc, OperationalError | InterfaceError):
                logger.warning("reply %s: database unavailable (%s)", reply.pk, exc.__class__.__name__)
                code, text = "database_unavailable", "The database is unavailable; try again."
            else:
                logger.exception("reply %s failed", reply.pk)
                code, text = "internal_error", "Internal error while generating the reply."
            values = dict(status=Message.Status.ERROR, content="".join(parts), error_code=code, error_message=text)
            final = error_frame(code, text, True, reply.pk)
        # The final frame, then the final write and the lock's release, shielded: a cancel (or disconnect) that
        # arrives once the outcome is known must not cut them short.
        ending = asyncio.ensure_future(_end(exchange, reply, heartbeat, emit, final, values))
        try:
            await asyncio.shield(ending)
        except asyncio.CancelledError as exc:
            await ending
            cancelled = cancelled or exc
        if cancelled is not None:
            raise cancelled
    finally:
        await heartbeat.stop()
        if exchange.lock is not None:  # not reached the end (a bug below us): still free the conversation
            await hotpath.release_lock(exchange)  # async Redis / the pool: no thread hop
        await _record_key_tokens(call, api_key, reply, exchange.extra.get("key_hold"))
    return reply


async def _end(exchange: Exchange, reply: Message, heartbeat: _Heartbeat, emit: Emit, final: dict[str, Any],
               values: dict[str, Any]) -> None:
    """The final frame and the final write. The frame never waits on the database: it goes out when the write
    is done (so a client that reads right after `done` sees the stored reply), when the write failed (it is
    then retried in the background), or after FINAL_FRAME_WAIT_SECONDS, whichever comes first."""
    await heartbeat.stop()
    write = asyncio.ensure_future(_finish_or_defer(exchange, values))
    try:
        await asyncio.wait([write], timeout=FINAL_FRAME_WAIT_SECONDS)
    finally:
        await _emit_quietly(emit, final)
        if not await write:
            _apply(reply, values)
            # REST has no frame to tell the outcome: 503 (retryable); the reply is stored once the database
            # is back, and a retry with the same client_id gets it.
            exchange.extra["error"] = ApiError(
                "The database is unavailable; try again.", code="database_unavailable", status_code=503,
                retryable=True, extra={"message_id": reply.pk, "status": Message.Status.PROCESSING})
        await hotpath.release_lock(exchange)


def _apply(reply: Message, values: dict[str, Any]) -> None:
    """The final state on the in-memory reply, so the final frame can tell it before it is written."""
    for name, value in values.items():
        setattr(reply, name, value)


async def _finish_or_defer(exchange: Exchange, values: dict[str, Any]) -> bool:
    """Writes the reply's final state (one statement on the async pool where it can); if the database is
    unreachable, retries it in the background. True if written now."""
    try:
        await hotpath.finish_reply(exchange, **values)
        return True
    except DatabaseError:
        logger.warning("final write of reply %s failed; retrying it in the background", exchange.reply.pk)

    def write() -> None:
        services.finish_reply(exchange, **values)

    return await sync_to_async(released(deferred.run_or_defer))(f"reply:{exchange.reply.pk}", write)


def _heartbeat_seconds() -> float:
    # Several beats per lease, so one lost write does not let a live generation's lease lapse.
    return min(CHECKPOINT_SECONDS, settings.CONVERSATION_LOCK_SECONDS / 3)


class _Heartbeat:
    """Renews the generation's lease and checkpoints its text while it runs (one statement on the async pool where
    it can, conversations.hotpath). Its failures never end the stream.

    Stopped by a flag as well as a cancel: redis-py's asyncio client can swallow a cancellation that lands inside a
    command (redis/redis-py#2028, #2551), and a beat that went on after it used to hold the reply's end forever
    (seen at 1,000 concurrent chats: replies stuck in `processing` with their lease still renewed).
    """

    def __init__(self, exchange: Exchange, parts: list[str]) -> None:
        self.stopping = False
        self.task = asyncio.create_task(self._run(exchange, parts))

    async def _run(self, exchange: Exchange, parts: list[str]) -> None:
        while True:
            await asyncio.sleep(_heartbeat_seconds())
            if self.stopping:
                return
            try:
                await hotpath.checkpoint(exchange, "".join(parts))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a missed beat: the next one (or the lease's slack) covers it
                logger.warning("heartbeat of reply %s failed (%s)", exchange.reply.pk, exc.__class__.__name__)

    async def stop(self) -> None:
        """Ends the beats; waits at most HEARTBEAT_STOP_SECONDS for one in flight (a late checkpoint is harmless: it
        only updates a reply still `processing`). A cancel of the caller goes on as usual."""
        self.stopping = True
        if self.task.done():
            return
        self.task.cancel()
        await asyncio.wait([self.task], timeout=HEARTBEAT_STOP_SECONDS)


async def _record_key_tokens(call: pipeline.PreparedCall | None, api_key: Any, reply: Message,
                             hold: keylimits.Hold | None = None) -> None:
    """The pipeline's finish: the tokens the reply used (real or estimated, as its usage record has them) replace
    the hold on the API key's tokens per minute (the exchange's hold, also when the call was never prepared)."""
    if not getattr(api_key, "tpm", None):
        return
    used = reply.prompt_tokens + reply.completion_tokens
    try:
        if call is not None:
            await pipeline.finish_counted(call, used)
        else:
            await pipeline.settle_tokens(api_key, hold, used)
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
