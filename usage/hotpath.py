"""A metered call's database work on the event loop: the hold and the record on the async pool (PostgreSQL).

The statements are usage.billing's own (`hold_statement`, `record_statement`): one builder, two executors,
so both paths write the same rows with the same conditional updates. Here they run on aiwriter.dbpool, one
round trip each and no thread hop; everything else falls back to the sync services through sync_to_async:
SQLite (dbpool off), staff debug runs, a cold price cache, a refused hold (no account yet, balance short), a
charge the balance no longer covers, and quota alerts. The quota limits (on a cold cache) and the counters an
account with limits or a key with a budget is checked against are one read on the pool (`limits_statement`).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence
from datetime import date, datetime
from decimal import Decimal
from enum import Enum
from typing import Any

from asgiref.sync import sync_to_async
from django.utils import timezone

from aiwriter import dbpool
from aiwriter.db import released
from aiwriter.observability import add_db_query, observe_usage_record
from aiwriter.singleflight import shared_load
from usage import periods, pricing
from usage.billing import counters, holds, recording
from usage.billing.calls import CallMeta, CallOutcome, CallPlan
from usage.billing.sql import _dec, _q
from usage.models import ApiKeyCounter, Quota, QuotaAlert, UsageCounter, UsageRecord
from usage.selectors import Limits, limits_from_rows

logger = logging.getLogger(__name__)


def _plain(params: Sequence[Any]) -> list[Any]:
    """The statement's parameters with Django's choices (Reservation.Status.HELD, LedgerEntry.Kind.CHARGE, …) as
    their plain values. psycopg finds no dumper registered for such a class and walks its MRO for one on every
    execution (~4.5 µs per parameter, raising a KeyError per miss): a few percent of a /v1 call's CPU."""
    return [p.value if isinstance(p, Enum) else p for p in params]


async def _warm_prices(*names: str | None) -> None:
    for name in filter(None, dict.fromkeys(names)):
        if not pricing.is_cached(name):
            await shared_load(("model-pricing", name), functools.partial(sync_to_async(pricing.model_pricing), name))


async def begin_call(*, ctx: Any, request: Any, now: datetime | None = None) -> CallPlan:
    """holds.begin_call, with the hold on the async pool: checks quota and key budget, then holds the
    worst-case cost. Raises InsufficientBalance / QuotaExceeded / KeyBudgetExceeded before any model call."""
    if not dbpool.enabled() or ctx.debug:
        return await sync_to_async(released(holds.begin_call))(ctx=ctx, request=request, now=now)
    started_at = now or timezone.now()
    period = periods.month_start(started_at)
    user_id, project = ctx.user.pk, ctx.project or ""
    limits = holds.cached_limits(user_id, project)
    if limits is None or limits.any or (ctx.api_key is not None and ctx.api_key.monthly_budget):
        # A cold cache (a new project), quota limits or a key budget: one read on the pool (the common account,
        # cached and without limits, reads nothing).
        limits = await _check_limits(user_id=user_id, project=project, period=period, limits=limits,
                                     api_key=ctx.api_key)
    plan = CallPlan(started_at=started_at, period=period, limits=limits)
    await _warm_prices(request.model, getattr(request, "fallback_model", None))
    amount = holds.worst_case_cost(request, started_at)
    if amount <= 0:
        return plan  # free models need no balance
    context = holds.hold_context(ctx, request, started_at, period)
    sql, params = holds.hold_statement(user_id, amount, context)
    try:
        row = await dbpool.fetchone(sql, _plain(params))
    except dbpool.PoolTimeout:
        logger.warning("async pool exhausted: the hold of user %s takes the sync path", user_id)
        return await sync_to_async(released(holds.begin_call))(ctx=ctx, request=request, now=started_at)
    except dbpool.psycopg.Error as exc:
        raise dbpool.django_error(exc) from exc
    if row is not None:
        plan.reservation_id, plan.reserved = row[0], amount
        return plan
    # Refused: no account yet (created there) or the balance is short (InsufficientBalance).
    return await sync_to_async(released(holds.hold_slow_path))(ctx=ctx, plan=plan, amount=amount, context=context)


def limits_statement(*, user_id: int, project: str, period: date, quota: bool,
                     api_key_id: int | None) -> tuple[str, list[Any]]:
    """The reads of holds._cached_quota_limits (`quota`: the Quota rows) and holds._check_limits (this month's
    counters of the account and the project, the key's counter) as one statement. Rows: (kind, project, tokens,
    cost), kind "q" (a Quota row: its limits), "c" (a UsageCounter) or "k" (the key's ApiKeyCounter)."""
    projects = sorted({"", project})
    parts = [f"SELECT 'c', project, tokens::numeric, cost::numeric FROM {_q(UsageCounter._meta.db_table)} "
             f"WHERE user_id = %s AND period = %s AND project = ANY(%s)"]
    params: list[Any] = [user_id, period, projects]
    if quota:
        parts.append(f"SELECT 'q', project, monthly_token_limit::numeric, monthly_cost_limit::numeric "
                     f"FROM {_q(Quota._meta.db_table)} WHERE user_id = %s AND project = ANY(%s)")
        params += [user_id, projects]
    if api_key_id is not None:
        parts.append(f"SELECT 'k', '', tokens::numeric, cost::numeric FROM {_q(ApiKeyCounter._meta.db_table)} "
                     f"WHERE api_key_id = %s AND period = %s")
        params += [api_key_id, period]
    return " UNION ALL ".join(parts), params


async def _check_limits(*, user_id: int, project: str, period: date, limits: Limits | None,
                        api_key: Any) -> Limits:
    """holds._cached_quota_limits (when `limits` is None) and holds._check_limits in one round trip on the pool;
    raises QuotaExceeded / KeyBudgetExceeded. No free connection: the sync reads, as before."""
    budget_key = api_key.pk if api_key is not None and api_key.monthly_budget else None
    sql, params = limits_statement(user_id=user_id, project=project, period=period, quota=limits is None,
                                   api_key_id=budget_key)
    try:
        async with dbpool.connection() as conn:
            started = time.perf_counter()
            cursor = await conn.execute(sql, _plain(params))
            rows = await cursor.fetchall()
            add_db_query((time.perf_counter() - started) * 1000)
    except dbpool.PoolTimeout:
        if limits is None:
            limits = await sync_to_async(released(holds._cached_quota_limits))(user_id, project)
        await sync_to_async(released(holds._check_limits))(user_id=user_id, project=project, period=period,
                                                              limits=limits, api_key=api_key)
        return limits
    except dbpool.psycopg.Error as exc:
        raise dbpool.django_error(exc) from exc
    if limits is None:
        limits = holds.remember_limits(user_id, project, limits_from_rows(
            {str(p): (t, c) for kind, p, t, c in rows if kind == "q"}))
    used = {str(p): (int(t), Decimal(c)) for kind, p, t, c in rows if kind == "c"}
    spent = next((Decimal(c) for kind, _, _, c in rows if kind == "k"), None)
    holds.check_used(period=period, limits=limits, used=used, api_key=api_key, key_spent=spent)
    return limits


def _near_limit(limit: tuple[int, Decimal], tokens_used: int, cost_used: Decimal) -> bool:
    # A cheap pre-check of counters._maybe_alert (which fires from WARNING_AT on): below it, no thread hop.
    token_limit, cost_limit = limit
    return bool((token_limit and tokens_used >= token_limit * counters.WARNING_AT)
                or (cost_limit and cost_used >= cost_limit * counters.WARNING_AT))


def _alerts(*, user_id: int, plan: CallPlan, scopes: list[str], row: tuple[Any, ...]) -> None:
    alerts: list[QuotaAlert] = []
    for i, scope in enumerate(scopes):
        limit = plan.limits.scopes.get(scope)
        if limit:
            alert = counters._maybe_alert(user_id=user_id, project=scope, period=plan.period, limit=limit,
                                          tokens_used=int(row[2 + 2 * i]), cost_used=_dec(row[3 + 2 * i]))
            if alert:
                alerts.append(alert)
    counters.deliver_alerts(alerts)


async def record_call(*, meta: CallMeta, plan: CallPlan, outcome: CallOutcome) -> UsageRecord | None:
    """recording.record_call's common case as one statement on the async pool; alerts are delivered here.

    Returns None when it did not write anything and the sync record_call must (debug, the charge not covered,
    no connection free). Raises django.db.DatabaseError when the statement failed once sent: the caller keeps
    the hold for reconcile rather than retry (the statement may have committed).
    """
    if not dbpool.enabled() or meta.debug:
        return None
    if not outcome.cache_hit:
        await _warm_prices(outcome.model)
    cost = recording.outcome_cost(plan, outcome)
    charge = outcome.billable
    stmt = recording.record_statement(meta=meta, plan=plan, outcome=outcome, cost=cost, charge=charge,
                                     now=timezone.now())
    try:
        row = await dbpool.fetchone(stmt.sql, _plain(stmt.params))
    except dbpool.PoolTimeout:
        logger.warning("async pool exhausted: the record of user %s takes the sync path", meta.user_id)
        return None
    except dbpool.psycopg.errors.DivisionByZero:
        return None  # the charge is not covered in full: rolled back; the general path decides
    except dbpool.psycopg.Error as exc:
        raise dbpool.django_error(exc) from exc
    assert row is not None  # the statement's INSERT ... RETURNING always gives its row
    record = stmt.record
    record.pk = row[0]
    record._state.adding, record._state.db = False, "default"
    # Committed already (autocommit): the model-call metrics count it now. (The sync path sends post_save,
    # whose only receiver does this after the commit.)
    observe_usage_record(record)
    if any(plan.limits.scopes.get(scope) and _near_limit(plan.limits.scopes[scope], int(row[2 + 2 * i]),
                                                         _dec(row[3 + 2 * i]))
           for i, scope in enumerate(stmt.scopes)):
        try:
            await sync_to_async(_alerts)(user_id=meta.user_id, plan=plan, scopes=stmt.scopes, row=row)
        except Exception:  # noqa: BLE001 - the call is recorded and charged; an alert is not money
            logger.exception("quota alert for user %s failed", meta.user_id)
    return record
