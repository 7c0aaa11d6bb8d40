"""Before a call: quota and key budget checks, the worst-case cost, and its hold (one statement on PostgreSQL)."""

from __future__ import annotations

import json
import time
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.db.models.signals import post_delete, post_save
from django.utils import timezone

from agents.llm import tokens
from aiwriter.db import vendor as db_vendor
from aiwriter.money import ZERO, call_cost
from usage import periods, pricing
from usage.billing.calls import CallPlan, call_meta
from usage.billing.ledger import _hold, ensure_account
from usage.billing.sql import _q
from usage.errors import InsufficientBalance, KeyBudgetExceeded, QuotaExceeded
from usage.models import ApiKey, ApiKeyCounter, CreditAccount, Reservation
from usage.selectors import Limits, month_counters, quota_limits


def _check_limits(*, user_id: int, project: str, period: date, limits: Limits, api_key: ApiKey | None) -> None:
    used = month_counters(user_id=user_id, period=period, projects={"", project}) if limits.any else {}
    spent = None
    if api_key is not None and api_key.monthly_budget:
        spent = ApiKeyCounter.objects.filter(api_key=api_key, period=period).values_list("cost", flat=True).first()
    check_used(period=period, limits=limits, used=used, api_key=api_key, key_spent=spent)


def check_used(*, period: date, limits: Limits, used: dict[str, tuple[int, Decimal]], api_key: ApiKey | None,
               key_spent: Decimal | None) -> None:
    """The quota and key-budget rule on counters already read (this month's per scope; the key's cost)."""
    if limits.any:
        for scope, (token_limit, cost_limit) in limits.scopes.items():
            tokens_used, cost_used = used.get(scope, (0, ZERO))
            if (token_limit and tokens_used >= token_limit) or (cost_limit and cost_used >= cost_limit):
                where = f"project '{scope}'" if scope else "account"
                raise QuotaExceeded(f"The monthly quota of your {where} is used up; it resets on "
                                    f"{periods.next_month(period).isoformat()}.")
    if api_key is not None and api_key.monthly_budget:
        if key_spent is not None and key_spent >= api_key.monthly_budget:
            raise KeyBudgetExceeded()


def _over_quota(*, user_id: int, project: str, period: date, limits: Limits) -> bool:
    try:
        _check_limits(user_id=user_id, project=project, period=period, limits=limits, api_key=None)
    except QuotaExceeded:
        return True
    return False


def worst_case_cost(request: Any, started_at: datetime) -> Decimal:
    """Prompt tokens (our tokenizer) + the most output the call may produce, at the dearest model it may use."""
    prompt = tokens.count_messages(request.messages, request.model)
    worst = ZERO
    for name in filter(None, {request.model, getattr(request, "fallback_model", None)}):
        info = pricing.model_pricing(name)
        if info is None:
            continue
        max_out = request.max_tokens or info.max_output_tokens
        worst = max(worst, call_cost(info.price_at(started_at), prompt_tokens=prompt, completion_tokens=max_out))
    return worst


# Quota rows change rarely and are read on every call: kept in process for LLM_ROUTE_CACHE_SECONDS, cleared
# here at once when a Quota or user is saved or deleted (other processes see a change within that time).
_limits_cache: dict[tuple[Any, ...], tuple[float, Limits]] = {}


def _cached_quota_limits(user_id: int, project: str) -> Limits:
    key = (user_id, project, settings.DEFAULT_MONTHLY_TOKEN_LIMIT, settings.DEFAULT_MONTHLY_COST_LIMIT)
    hit = _limits_cache.get(key)
    if hit is not None and hit[0] > time.monotonic():
        return hit[1]
    return remember_limits(user_id, project, quota_limits(user_id=user_id, project=project))


def remember_limits(user_id: int, project: str, limits: Limits) -> Limits:
    """Caches limits read elsewhere (the async pool: usage.hotpath) as _cached_quota_limits does."""
    if len(_limits_cache) >= 10_000:
        _limits_cache.clear()
    key = (user_id, project, settings.DEFAULT_MONTHLY_TOKEN_LIMIT, settings.DEFAULT_MONTHLY_COST_LIMIT)
    _limits_cache[key] = (time.monotonic() + settings.LLM_ROUTE_CACHE_SECONDS, limits)
    return limits


def cached_limits(user_id: int, project: str) -> Limits | None:
    """The cached limits, or None when they must be read (async callers: no query on the event loop)."""
    hit = _limits_cache.get((user_id, project, settings.DEFAULT_MONTHLY_TOKEN_LIMIT,
                             settings.DEFAULT_MONTHLY_COST_LIMIT))
    return hit[1] if hit is not None and hit[0] > time.monotonic() else None


def clear_limits_cache(*args: Any, **kwargs: Any) -> None:
    _limits_cache.clear()


for _sender in ("usage.Quota", settings.AUTH_USER_MODEL):
    post_save.connect(clear_limits_cache, sender=_sender, dispatch_uid=f"usage-limits-cache-save-{_sender}")
    post_delete.connect(clear_limits_cache, sender=_sender, dispatch_uid=f"usage-limits-cache-delete-{_sender}")


def hold_statement(user_id: int, amount: Decimal, context: dict[str, Any]) -> tuple[str, list[Any]]:
    """PostgreSQL: the hold and its Reservation row as ONE statement (atomic by itself, so no BEGIN/COMMIT round
    trips). Its row is (reservation id,), none when the free balance is short or there is no account.
    Built once for both executors: the sync ORM connection (_hold_and_reserve) and the async pool (usage.hotpath)."""
    accounts, reservations = _q(CreditAccount._meta.db_table), _q(Reservation._meta.db_table)
    now = timezone.now()
    sql = (f"WITH held AS (UPDATE {accounts} SET reserved = reserved + %s, updated_at = %s "
           f"WHERE user_id = %s AND balance - reserved >= %s RETURNING id) "
           f"INSERT INTO {reservations} (account_id, amount, status, context, created_at) "
           f"SELECT id, %s, %s, %s::jsonb, %s FROM held RETURNING id")
    return sql, [amount, now, user_id, amount, amount, Reservation.Status.HELD, json.dumps(context), now]


def _hold_and_reserve(user_id: int, amount: Decimal, context: dict[str, Any]) -> int | None:
    """Returns the reservation id, or None when the free balance is short or there is no account."""
    sql, params = hold_statement(user_id, amount, context)
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        row = cursor.fetchone()
    return row[0] if row else None


def hold_context(ctx: Any, request: Any, started_at: datetime, period: date) -> dict[str, Any]:
    """What a hold keeps of its call, so a reconcile can write the record."""
    return {**call_meta(ctx).as_json(), "started_at": started_at.isoformat(), "period": period.isoformat(),
            "model": request.model}


def begin_call(*, ctx: Any, request: Any, now: datetime | None = None) -> CallPlan:
    """Checks quota and key budget, then holds the worst-case cost. Raises before any model call when refused."""
    started_at = now or timezone.now()
    period = periods.month_start(started_at)
    user_id = ctx.user.pk
    limits = _cached_quota_limits(user_id, ctx.project or "")
    plan = CallPlan(started_at=started_at, period=period, limits=limits)
    if ctx.debug:
        return plan  # staff debug runs are never charged nor counted
    _check_limits(user_id=user_id, project=ctx.project or "", period=period, limits=limits, api_key=ctx.api_key)
    amount = worst_case_cost(request, started_at)
    if amount <= 0:
        return plan  # free models need no balance
    context = hold_context(ctx, request, started_at, period)
    if db_vendor() == "postgresql":
        reservation_id = _hold_and_reserve(user_id, amount, context)
        if reservation_id is not None:
            plan.reservation_id, plan.reserved = reservation_id, amount
            return plan
    return hold_slow_path(ctx=ctx, plan=plan, amount=amount, context=context)


def hold_slow_path(*, ctx: Any, plan: CallPlan, amount: Decimal, context: dict[str, Any]) -> CallPlan:
    """The hold when the one-statement one was refused (or not PostgreSQL)."""
    user_id = ctx.user.pk
    # Other backends, and on PostgreSQL a refused hold: no account yet (created here) or the balance is short.
    with transaction.atomic():
        account_id = _hold(user_id, amount)
        if account_id is None and not CreditAccount.objects.filter(user_id=user_id).exists():
            ensure_account(ctx.user)
            account_id = _hold(user_id, amount)
        if account_id is None:
            raise InsufficientBalance(extra={"required": str(amount.normalize())})
        reservation = Reservation.objects.create(account_id=account_id, amount=amount, context=context)
    plan.reservation_id, plan.reserved = reservation.pk, amount
    return plan
