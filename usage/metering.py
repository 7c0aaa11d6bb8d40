"""Metered model calls: every call from every entry point goes through here exactly once.

    ctx = CallContext(user=user, entry_point="chat", conversation=conv, message=msg)
    async for item in metered_stream(ctx, request):   # TextDelta..., then one MeteredResult
        ...
    metered = await metered_complete(ctx, request)

Before the call: quota and balance checks, and a reservation of the worst-case cost; raises
InsufficientBalance / QuotaExceeded / KeyBudgetExceeded (usage.errors) without calling the model.
After: one UsageRecord and (unless debug) the charge, in one transaction. On LLMError the failure is
recorded and the error re-raised with `.usage_record` set. A stream closed early by the caller
(aclose / cancellation) is recorded as partial and billed per CUTOFF_BILLING_POLICY.

Billing of each outcome:
- success: measured (or, without an upstream usage chunk, estimated) tokens; a response-cache hit costs 0;
- cut off by the caller, or an LLMError after some text was delivered: `partial`, charged per the policy —
  "delivered": prompt + the text actually delivered; "drain": keep reading the upstream (up to
  CUTOFF_DRAIN_MAX_SECONDS) and bill its final usage. Never an error text, never zero for delivered text;
- an LLMError before any text: recorded as an error with the cost of tokens the upstream reported, not charged.
If writing the record fails after the upstream answered, the hold stays with the outcome saved on it (charged by
the sweeper or `manage.py reconcile_reservations`), or, when the database is unreachable, the record is retried in
the background until it is back (`aiwriter.deferred`): never a free call.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import Error as DatabaseError  # InterfaceError too: a connection lost mid-call

from agents.llm import service, tokens
from agents.llm.types import ChatRequest, ChatResult, LLMError, TextDelta
from aiwriter import deferred
from aiwriter.db import released
from aiwriter.observability import add_timing, timing
from usage import hotpath
from usage.billing.calls import CallOutcome, CallPlan, call_meta
from usage.billing.counters import deliver_alerts
from usage.billing.reconcile import save_pending_result, settle_pending_call
from usage.billing.recording import outcome_cost, record_call
from usage.models import UsageRecord

logger = logging.getLogger(__name__)


@dataclass
class CallContext:
    user: Any
    entry_point: str
    api_key: Any = None
    project: str = ""
    agent: Any = None
    conversation: Any = None
    message: Any = None
    debug: bool = False  # staff debug run: logged with its cost, never charged
    workflow_type: str = ""
    now: datetime | None = None  # the call's start time (tests pass it to pin the quota month and the price)
    # Set by metering once the call is recorded: how a caller whose stream was cut off (cancel, aclose) learns
    # what it was charged, since it gets no MeteredResult.
    usage_record: UsageRecord | None = None


@dataclass
class MeteredResult:
    result: ChatResult
    record: UsageRecord
    cost: Decimal
    # True when the record could not be written (database error): `record` is unsaved and the hold waits for
    # `reconcile_reservations`, which writes the record and charges it.
    pending_reconcile: bool = False


def _finish(ctx: CallContext, plan: CallPlan, outcome: CallOutcome) -> tuple[UsageRecord, bool]:
    """Writes the record and the charge; on a database error keeps the outcome for later. Returns (record, pending).

    The outcome is saved on the hold (reconcile and the sweeper charge it); if the database cannot take even that
    (it is unreachable), the record itself is retried in the background until the database is back: a call the
    upstream served is never left without its record because of a short outage.
    """
    meta = call_meta(ctx)
    try:
        record, alerts = record_call(meta=meta, plan=plan, outcome=outcome)
    except DatabaseError:
        return _keep_for_reconcile(ctx, plan, outcome)
    deliver_alerts(alerts)  # after the commit, never inside the money transaction
    return record, False


def _keep_for_reconcile(ctx: CallContext, plan: CallPlan, outcome: CallOutcome) -> tuple[UsageRecord, bool]:
    """Recording failed: the outcome goes on the hold for `reconcile_reservations` (or, if even that fails, is
    recorded in the background once the database is back); an unsaved record to show."""
    deferred.close_broken_connection()
    meta = call_meta(ctx)
    logger.exception("recording a %s call for user %s failed; hold %s left for reconcile", outcome.model,
                     meta.user_id, plan.reservation_id)
    try:
        saved = save_pending_result(plan=plan, outcome=outcome)
    except DatabaseError:
        deferred.close_broken_connection()
        saved = False
    if not saved:
        logger.warning("call outcome not saved (hold %s); recording it when the database is back: %s",
                       plan.reservation_id, outcome.as_json())
        deferred.defer(f"usage:{plan.reservation_id or id(outcome)}",
                       lambda: settle_pending_call(meta=meta, plan=plan, outcome=outcome))
    unsaved = UsageRecord(user_id=meta.user_id, model=outcome.model, provider=outcome.provider,
                          prompt_tokens=outcome.prompt_tokens, completion_tokens=outcome.completion_tokens,
                          total_tokens=outcome.prompt_tokens + outcome.completion_tokens,
                          token_source=outcome.token_source, status=outcome.status, entry_point=ctx.entry_point,
                          cost=outcome_cost(plan, outcome))
    return unsaved, True


async def _finish_async(ctx: CallContext, plan: CallPlan, outcome: CallOutcome) -> tuple[UsageRecord, bool]:
    """On PostgreSQL the common case is one statement on the async pool (usage.hotpath); else the sync path."""
    try:
        record = await hotpath.record_call(meta=call_meta(ctx), plan=plan, outcome=outcome)
    except DatabaseError:
        # Sent and failed: it may have committed, so no retry; the hold keeps the outcome for reconcile.
        return await sync_to_async(released(_keep_for_reconcile))(ctx, plan, outcome)
    if record is not None:
        return record, False
    return await sync_to_async(released(_finish))(ctx, plan, outcome)


def _success_outcome(result: ChatResult) -> CallOutcome:
    return CallOutcome(
        status=UsageRecord.Status.SUCCESS, model=result.model, provider=result.provider,
        upstream_model=result.upstream_model, prompt_tokens=result.usage.prompt_tokens,
        cached_prompt_tokens=result.usage.cached_prompt_tokens, completion_tokens=result.usage.completion_tokens,
        token_source=result.usage.source, cache_hit=result.cache_hit, fallback=result.fallback,
        latency_ms=result.latency_ms, ttft_ms=result.ttft_ms,
        metadata={"fallback_reason": result.fallback_reason} if result.fallback_reason else {},
    )


def _delivered_outcome(request: ChatRequest, delivered: str, *, status: str, partial: ChatResult | None,
                       error_code: str, started: float, ttft_ms: int | None) -> CallOutcome:
    """Prompt + the text the caller actually received (never an error text); billable iff text was delivered."""
    model = partial.model if partial else request.model
    counter_model = (partial.upstream_model if partial and partial.upstream_model else model)
    prompt = partial.usage.prompt_tokens if partial and partial.usage.prompt_tokens else \
        tokens.count_messages(request.messages, counter_model)
    completion = tokens.count_text(delivered, counter_model)
    billable = completion > 0
    measured_prompt = bool(partial and partial.usage.source == "measured" and partial.usage.prompt_tokens)
    return CallOutcome(
        status=status, model=model, provider=partial.provider if partial else "",
        upstream_model=partial.upstream_model if partial else "",
        # Failed before any text: keep the upstream-reported prompt cost on the record (not charged), if any.
        prompt_tokens=prompt if (billable or measured_prompt) else 0,
        cached_prompt_tokens=partial.usage.cached_prompt_tokens if partial else 0,
        completion_tokens=completion, billable=billable,
        token_source=UsageRecord.TokenSource.PARTIAL if billable else
        (UsageRecord.TokenSource.MEASURED if measured_prompt else UsageRecord.TokenSource.ESTIMATED),
        fallback=partial.fallback if partial else False, error_code=error_code,
        latency_ms=int((time.monotonic() - started) * 1000), ttft_ms=ttft_ms,
    )


def _generated(item: TextDelta) -> str:
    """What a streamed piece generated: its text and the arguments of function calls (billed alike when cut off)."""
    if not item.tool_calls:
        return item.content
    return item.content + "".join((c.get("function") or {}).get("arguments") or "" for c in item.tool_calls)


async def _drain(inner: AsyncGenerator[TextDelta | ChatResult, None], delivered: list[str]) -> ChatResult | None:
    """Reads on after the caller left, up to CUTOFF_DRAIN_MAX_SECONDS, for the upstream's final usage."""
    try:
        async with asyncio.timeout(settings.CUTOFF_DRAIN_MAX_SECONDS):
            async for item in inner:
                if isinstance(item, ChatResult):
                    return item
                delivered.append(_generated(item))  # generated and paid upstream, though not shown
    except (TimeoutError, LLMError):
        return None
    return None


async def _record(ctx: CallContext, plan: CallPlan, outcome: CallOutcome) -> tuple[UsageRecord, bool]:
    # Shielded: a second cancellation of the caller must not lose the record of a call the upstream served.
    with timing("metering"):
        record, pending = await asyncio.shield(_finish_async(ctx, plan, outcome))
    ctx.usage_record = record
    return record, pending


async def metered_stream(ctx: CallContext, request: ChatRequest, *,
                         whole: bool = False) -> AsyncGenerator[TextDelta | MeteredResult, None]:
    """whole=True (metered_complete): no TextDelta, whole-reply semantics of service.complete (timeout in total)."""
    with timing("quota"):  # quota check and the credit hold
        # the sync fallbacks inside release their pooled connection before the model answers (aiwriter/db.py)
        plan = await hotpath.begin_call(ctx=ctx, request=request, now=ctx.now)
    started = time.monotonic()
    ttft_ms: int | None = None
    delivered: list[str] = []
    inner = service.stream(request, whole=whole)
    final: ChatResult | None = None
    try:
        async for item in inner:
            if isinstance(item, ChatResult):
                final = item
                continue
            if ttft_ms is None:
                ttft_ms = int((time.monotonic() - started) * 1000)
            delivered.append(_generated(item))
            yield item
    except LLMError as exc:
        outcome = _delivered_outcome(request, "".join(delivered), status=UsageRecord.Status.ERROR,
                                     partial=exc.partial, error_code=exc.code, started=started, ttft_ms=ttft_ms)
        exc.usage_record, _ = await _record(ctx, plan, outcome)
        raise
    except (GeneratorExit, asyncio.CancelledError):
        # The caller left mid-stream (aclose or cancellation): bill per the cut-off policy, then let it go.
        drained = None
        if settings.CUTOFF_BILLING_POLICY == "drain":
            drained = await _drain(inner, delivered)
        await inner.aclose()
        if drained is not None:
            outcome = _success_outcome(drained)
            outcome.status, outcome.token_source = UsageRecord.Status.CANCELLED, UsageRecord.TokenSource.PARTIAL
        else:
            outcome = _delivered_outcome(request, "".join(delivered), status=UsageRecord.Status.CANCELLED,
                                         partial=None, error_code="client_closed", started=started, ttft_ms=ttft_ms)
        await _record(ctx, plan, outcome)
        raise
    except Exception as exc:
        # A bug below us, not an upstream failure: release the hold, keep a record, re-raise.
        outcome = _delivered_outcome(request, "".join(delivered), status=UsageRecord.Status.ERROR, partial=None,
                                     error_code=type(exc).__name__[:50], started=started, ttft_ms=ttft_ms)
        await _record(ctx, plan, outcome)
        raise
    if final is None:  # the service layer promises a ChatResult; treat its absence as a failure
        err = LLMError("The model returned no result.", code="no_result")
        outcome = _delivered_outcome(request, "".join(delivered), status=UsageRecord.Status.ERROR, partial=None,
                                     error_code=err.code, started=started, ttft_ms=ttft_ms)
        err.usage_record, _ = await _record(ctx, plan, outcome)
        raise err
    add_timing("upstream", final.latency_ms)
    record, pending = await _record(ctx, plan, _success_outcome(final))
    yield MeteredResult(result=final, record=record, cost=record.cost, pending_reconcile=pending)


async def metered_complete(ctx: CallContext, request: ChatRequest) -> MeteredResult:
    """A whole reply, metered: request.timeout counts in total, then the fallback model (like service.complete)."""
    final = None
    async for item in metered_stream(ctx, request, whole=True):
        if isinstance(item, MeteredResult):
            final = item
    assert final is not None
    return final
