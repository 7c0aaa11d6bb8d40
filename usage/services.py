"""Writes for the usage app: API keys, credits, the hold and the record of a metered call, consumption reports.

Money rules (PostgreSQL is the source of truth; Redis is never consulted for money):
- a hold is a conditional UPDATE (`balance - reserved >= amount`), so concurrent calls can never over-commit;
- the record, the charge, the ledger entry, the counters and the rollup are written in ONE transaction;
- CHECK constraints (balance >= 0, reserved <= balance) back every UPDATE.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import DataError, IntegrityError, connection, transaction
from django.db.models import Q
from django.db.models.signals import post_delete, post_save
from django.utils import timezone

from agents.llm import tokens
from aiwriter.errors import ApiError, Conflict
from aiwriter.money import MONEY_LIMIT, ZERO, call_cost, quantize
from usage import periods, pricing
from usage.errors import InsufficientBalance, KeyBudgetExceeded, QuotaExceeded
from usage.models import (
    ApiKey,
    ApiKeyCounter,
    CreditAccount,
    DailyRollup,
    IdempotencyKey,
    LedgerEntry,
    QuotaAlert,
    Reservation,
    UsageCounter,
    UsageRecord,
)
from usage.selectors import Limits, month_counters, quota_limits

logger = logging.getLogger(__name__)

WARNING_AT = Decimal("0.9")
CRITICAL_AT = Decimal("1")


# --- API keys -----------------------------------------------------------------------------------------------------

@transaction.atomic
def create_api_key(*, user: AbstractBaseUser, name: str = "default", project: str = "",
                   expires_at: datetime | None = None) -> tuple[ApiKey, str]:
    """Creates a key and returns it with the raw secret, which is never stored or shown again."""
    raw, prefix, key_hash = ApiKey.generate()
    api_key = ApiKey.objects.create(user=user, name=name, prefix=prefix, key_hash=key_hash, project=project,
                                    expires_at=expires_at)
    return api_key, raw


def revoke_api_key(*, api_key: ApiKey) -> ApiKey:
    if api_key.revoked_at is None:
        api_key.revoked_at = timezone.now()
        api_key.save(update_fields=["revoked_at"])
    return api_key


# --- Accounts and credits -----------------------------------------------------------------------------------------

def ensure_account(user: AbstractBaseUser) -> CreditAccount:
    """The user's credit account; a new one starts with settings.NEW_USER_CREDIT (as a ledger top-up)."""
    account = CreditAccount.objects.filter(user=user).first()
    if account is not None:
        return account
    credit = quantize(settings.NEW_USER_CREDIT)
    with transaction.atomic():
        account, created = CreditAccount.objects.get_or_create(user=user, defaults={"balance": credit})
        if created and credit > 0:
            LedgerEntry.objects.create(account=account, amount=credit, kind=LedgerEntry.Kind.TOPUP,
                                       reason="New account credit", balance_after=credit)
    return account


def grant_credits(*, user: AbstractBaseUser, amount: Decimal, reason: str, created_by: AbstractBaseUser | None,
                  kind: str = LedgerEntry.Kind.TOPUP) -> LedgerEntry:
    """Adds (or, as an adjustment, removes) credit. A top-up must be positive; nothing goes below what is held."""
    amount = quantize(Decimal(amount))
    if kind not in (LedgerEntry.Kind.TOPUP, LedgerEntry.Kind.ADJUSTMENT, LedgerEntry.Kind.REFUND):
        raise ApiError(f"Credits cannot be granted as '{kind}'.", code="invalid")
    if amount == 0 or (amount < 0 and kind != LedgerEntry.Kind.ADJUSTMENT):
        raise ApiError("The amount must be positive (a negative amount is an adjustment).", code="invalid")
    ensure_account(user)
    with transaction.atomic():
        account = CreditAccount.objects.select_for_update().get(user=user)
        if account.balance + amount < account.reserved:
            raise InsufficientBalance("The adjustment would take the balance below zero or below what is held.")
        if account.balance + amount >= MONEY_LIMIT:  # the column would overflow: a 500 otherwise
            raise ApiError(f"The balance would pass the largest amount kept ({MONEY_LIMIT - 1}).", code="invalid")
        account.balance += amount
        account.save(update_fields=["balance", "updated_at"])
        return LedgerEntry.objects.create(account=account, amount=amount, kind=kind, reason=reason[:255],
                                          created_by=created_by, balance_after=account.balance)


# --- Raw SQL helpers: upserts that increment, conditional updates that return ----------------------------------------

def _q(name: str) -> str:
    return connection.ops.quote_name(name)


def _num(value: Decimal) -> Decimal | str:
    # SQLite compares a bare text parameter as text; CAST(... AS NUMERIC) makes it a number on both backends.
    return str(value) if connection.vendor == "sqlite" else value


def _dec(value: Any) -> Decimal:
    return quantize(Decimal(str(value)))


def _upsert_add(model, keys: dict[str, Any], adds: dict[str, Any], returning: tuple[str, ...] = ()) -> tuple | None:
    """INSERT … ON CONFLICT (keys) DO UPDATE SET col = col + EXCLUDED.col [RETURNING …]: one statement."""
    table = _q(model._meta.db_table)
    cols = [*keys, *adds]
    values = []
    params: list[Any] = []
    for value in [*keys.values(), *adds.values()]:
        if isinstance(value, Decimal):
            values.append("CAST(%s AS NUMERIC)")
            params.append(_num(value))
        elif isinstance(value, date) and not isinstance(value, datetime):
            values.append("%s")
            params.append(connection.ops.adapt_datefield_value(value))
        else:
            values.append("%s")
            params.append(value)
    sets = ", ".join(f"{_q(c)} = {table}.{_q(c)} + EXCLUDED.{_q(c)}" for c in adds)
    sql = (f"INSERT INTO {table} ({', '.join(_q(c) for c in cols)}) VALUES ({', '.join(values)}) "
           f"ON CONFLICT ({', '.join(_q(c) for c in keys)}) DO UPDATE SET {sets}")
    if returning:
        sql += " RETURNING " + ", ".join(_q(c) for c in returning)
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchone() if returning else None


def _hold(user_id: int, amount: Decimal) -> int | None:
    """Holds `amount` if the free balance covers it; returns the account id, or None when short (or no account)."""
    table = _q(CreditAccount._meta.db_table)
    sql = (f"UPDATE {table} SET reserved = reserved + CAST(%s AS NUMERIC), updated_at = %s "
           f"WHERE user_id = %s AND balance - reserved >= CAST(%s AS NUMERIC) RETURNING id")
    with connection.cursor() as cursor:
        cursor.execute(sql, [_num(amount), connection.ops.adapt_datetimefield_value(timezone.now()), user_id,
                             _num(amount)])
        row = cursor.fetchone()
    return row[0] if row else None


def _settle_account(user_id: int, cost: Decimal, held: Decimal) -> tuple[Decimal, Decimal, int | None]:
    """Takes `cost` and drops `held` from the hold; returns (charged, balance after, account id or None).

    Charges at most the free balance plus this call's own hold: other calls' holds and zero are never crossed.
    """
    table = _q(CreditAccount._meta.db_table)
    sql = (f"UPDATE {table} SET balance = balance - CAST(%s AS NUMERIC), reserved = reserved - CAST(%s AS NUMERIC), "
           f"updated_at = %s WHERE user_id = %s AND balance - CAST(%s AS NUMERIC) >= reserved - CAST(%s AS NUMERIC) "
           f"RETURNING balance, id")
    with connection.cursor() as cursor:
        cursor.execute(sql, [_num(cost), _num(held), connection.ops.adapt_datetimefield_value(timezone.now()),
                             user_id, _num(cost), _num(held)])
        row = cursor.fetchone()
    if row is not None:
        return cost, _dec(row[0]), row[1]
    # Rare: the actual cost exceeds what the free balance covers (e.g. a pricier fallback). Charge what is there.
    account = CreditAccount.objects.select_for_update().filter(user_id=user_id).first()
    if account is None:
        return ZERO, ZERO, None
    held = min(held, account.reserved)
    charged = max(ZERO, min(cost, account.balance - (account.reserved - held)))
    account.balance -= charged
    account.reserved -= held
    account.save(update_fields=["balance", "reserved", "updated_at"])
    return charged, account.balance, account.pk


# --- A metered call: plan (quota, budget, hold) and record (record, charge, counters, rollup, alerts) ---------------

@dataclass
class CallPlan:
    started_at: datetime
    period: date
    limits: Limits
    reservation_id: int | None = None
    reserved: Decimal = ZERO


@dataclass
class CallOutcome:
    """What a call did. `billable`: it is charged and counted (success, or output delivered before a cut-off)."""

    status: str
    model: str
    provider: str = ""
    upstream_model: str = ""
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    completion_tokens: int = 0
    token_source: str = UsageRecord.TokenSource.MEASURED
    billable: bool = True
    cache_hit: bool = False
    fallback: bool = False
    latency_ms: int | None = None
    ttft_ms: int | None = None
    error_code: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CallMeta:
    """The identity of a call, by ids: kept on its hold as JSON so a reconcile can write the record."""

    user_id: int
    entry_point: str
    project: str = ""
    agent_id: int | None = None
    conversation_id: int | None = None
    message_id: int | None = None
    api_key_id: int | None = None
    debug: bool = False
    workflow_type: str = ""
    idempotency_key: str | None = None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CallMeta:
        """From a hold's context, which also holds the call's start, period and model."""
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


def call_meta(ctx: Any) -> CallMeta:
    def pk(obj: Any) -> Any:
        return getattr(obj, "pk", obj)

    return CallMeta(
        user_id=pk(ctx.user), project=ctx.project or "", agent_id=pk(ctx.agent),
        conversation_id=pk(ctx.conversation), message_id=pk(ctx.message), api_key_id=pk(ctx.api_key),
        entry_point=ctx.entry_point, debug=bool(ctx.debug), workflow_type=ctx.workflow_type or "",
        idempotency_key=getattr(ctx, "idempotency_key", None),
    )


def _check_limits(*, user_id: int, project: str, period: date, limits: Limits, api_key: ApiKey | None) -> None:
    if limits.any:
        used = month_counters(user_id=user_id, period=period, projects={"", project})
        for scope, (token_limit, cost_limit) in limits.scopes.items():
            tokens_used, cost_used = used.get(scope, (0, ZERO))
            if (token_limit and tokens_used >= token_limit) or (cost_limit and cost_used >= cost_limit):
                where = f"project '{scope}'" if scope else "account"
                raise QuotaExceeded(f"The monthly quota of your {where} is used up; it resets on "
                                    f"{periods.next_month(period).isoformat()}.")
    if api_key is not None and api_key.monthly_budget:
        spent = ApiKeyCounter.objects.filter(api_key=api_key, period=period).values_list("cost", flat=True).first()
        if spent is not None and spent >= api_key.monthly_budget:
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
_limits_cache: dict[tuple, tuple[float, Limits]] = {}


def _cached_quota_limits(user_id: int, project: str) -> Limits:
    key = (user_id, project, settings.DEFAULT_MONTHLY_TOKEN_LIMIT, settings.DEFAULT_MONTHLY_COST_LIMIT)
    hit = _limits_cache.get(key)
    if hit is not None and hit[0] > time.monotonic():
        return hit[1]
    limits = quota_limits(user_id=user_id, project=project)
    if len(_limits_cache) >= 10_000:
        _limits_cache.clear()
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
    if connection.vendor == "postgresql":
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


def outcome_cost(plan: CallPlan, outcome: CallOutcome) -> Decimal:
    """At the price in force when the call started; a response-cache hit costs 0."""
    if outcome.cache_hit:
        return ZERO
    return call_cost(pricing.price_at(outcome.model, plan.started_at), prompt_tokens=outcome.prompt_tokens,
                     cached_prompt_tokens=outcome.cached_prompt_tokens, completion_tokens=outcome.completion_tokens)


def record_call(*, meta: CallMeta, plan: CallPlan, outcome: CallOutcome) -> tuple[UsageRecord, list[QuotaAlert]]:
    """Writes the record, settles the hold, charges, counts and rolls up, all in one transaction.

    Returns the record and any quota alerts it raised; deliver those with `deliver_alerts` after this returns.
    """
    debug = meta.debug
    cost = outcome_cost(plan, outcome)
    charge = outcome.billable and not debug
    now = timezone.now()
    user_id = meta.user_id
    if connection.vendor == "postgresql" and not debug:
        try:
            return _record_call_pg(meta=meta, plan=plan, outcome=outcome, cost=cost, charge=charge, now=now)
        except _SlowPath:
            pass  # rolled back: the balance does not cover the cost (or no account); the general path below decides
    with transaction.atomic():
        record = UsageRecord.objects.create(
            user_id=user_id, project=meta.project, agent_id=meta.agent_id,
            conversation_id=meta.conversation_id, message_id=meta.message_id,
            api_key_id=meta.api_key_id, provider=outcome.provider, model=outcome.model,
            upstream_model=outcome.upstream_model, prompt_tokens=outcome.prompt_tokens,
            cached_prompt_tokens=outcome.cached_prompt_tokens, completion_tokens=outcome.completion_tokens,
            total_tokens=outcome.prompt_tokens + outcome.completion_tokens, token_source=outcome.token_source,
            cost=cost, cached=outcome.cache_hit, debug=debug, fallback=outcome.fallback,
            charged=charge and cost > 0, status=outcome.status, error_code=outcome.error_code[:50],
            latency_ms=outcome.latency_ms, ttft_ms=outcome.ttft_ms, entry_point=meta.entry_point,
            workflow_type=meta.workflow_type, metadata=outcome.metadata,
            idempotency_key=meta.idempotency_key, created_at=plan.started_at,
        )
        held = ZERO
        if plan.reservation_id:
            still_held = Reservation.objects.filter(pk=plan.reservation_id, status=Reservation.Status.HELD).update(
                status=Reservation.Status.SETTLED if charge else Reservation.Status.RELEASED, settled_at=now,
                usage_record=record)
            held = plan.reserved if still_held else ZERO  # a reconcile may have released it already
        to_charge = cost if charge else ZERO
        if to_charge > 0 or held > 0:
            charged, balance_after, account_id = _settle_account(user_id, to_charge, held)
            if charged != to_charge:
                if account_id is None:  # no account: a priced call that held nothing (e.g. a pricier fallback)
                    ensure_account(record.user)
                    charged, balance_after, account_id = _settle_account(user_id, to_charge, ZERO)
                if charged != to_charge:
                    logger.warning("usage record %s: cost %s exceeds the balance; charged %s", record.pk, cost,
                                   charged)
                    record.metadata = {**record.metadata, "uncharged": str(to_charge - charged)}
                    record.charged = charged > 0
                    record.save(update_fields=["metadata", "charged"])
            if charged > 0:
                _ledger_charge(account_id, charged, balance_after, record, outcome.model, meta.entry_point)
        else:
            charged = ZERO
        alerts: list[QuotaAlert] = []
        if not debug:
            alerts = _count(meta=meta, plan=plan, outcome=outcome, record=record, charged=charged if charge else ZERO,
                            counted=charge)
    return record, alerts


class _SlowPath(Exception):
    """The one-statement path could not settle the call in full: roll it back and take the general path."""


@dataclass
class RecordStatement:
    record: UsageRecord  # unsaved: its pk comes back in the statement's row
    sql: str
    params: list[Any]
    scopes: list[str]  # counters the row reports (tokens, cost) for, in order


def record_statement(*, meta: CallMeta, plan: CallPlan, outcome: CallOutcome, cost: Decimal, charge: bool,
                     now: datetime) -> RecordStatement:
    """PostgreSQL: what record_call writes (record, hold settled, charge, ledger entry, counters, rollup) as ONE
    statement of data-modifying CTEs. Built once for both executors: the sync ORM connection (_record_call_pg)
    and the async pool (usage.hotpath).

    The common case only: the charge is covered in full. Otherwise (the balance no longer covers the cost, no
    account) the statement fails with division_by_zero (SLOW_PATH_SQLSTATE), so nothing of it stays, even in
    autocommit, and the caller goes the general way. Same rows, same values, same conditional updates as the
    general path; one round trip instead of six to nine, and no ORM compilation on the hot path.
    Its row: record id, 1, then (tokens, cost) of each counter in `scopes`.
    """
    user_id, project = meta.user_id, meta.project
    to_charge = cost if charge else ZERO
    record = UsageRecord(
        user_id=user_id, project=project, agent_id=meta.agent_id,
        conversation_id=meta.conversation_id, message_id=meta.message_id,
        api_key_id=meta.api_key_id, provider=outcome.provider, model=outcome.model,
        upstream_model=outcome.upstream_model, prompt_tokens=outcome.prompt_tokens,
        cached_prompt_tokens=outcome.cached_prompt_tokens, completion_tokens=outcome.completion_tokens,
        total_tokens=outcome.prompt_tokens + outcome.completion_tokens, token_source=outcome.token_source,
        cost=cost, cached=outcome.cache_hit, debug=False, fallback=outcome.fallback,
        charged=charge and cost > 0, status=outcome.status, error_code=outcome.error_code[:50],
        latency_ms=outcome.latency_ms, ttft_ms=outcome.ttft_ms, entry_point=meta.entry_point,
        workflow_type=meta.workflow_type, metadata=outcome.metadata,
        idempotency_key=meta.idempotency_key, created_at=plan.started_at,
    )
    # The record's values travel as one JSON parameter: psycopg caches the parsing of a statement only up to 4 kB
    # and 50 parameters, and a literal per column would take this one past both.
    fields = [f for f in UsageRecord._meta.concrete_fields if not f.primary_key]
    columns = ", ".join(_q(f.column) for f in fields)
    table = _q(UsageRecord._meta.db_table)
    params: list[Any] = [json.dumps({f.column: f.pre_save(record, True) for f in fields}, default=str)]
    ctes = [f"rec AS (INSERT INTO {table} ({columns}) SELECT {columns} FROM jsonb_populate_record(NULL::{table}, "
            f"%s::jsonb) RETURNING id)"]
    settles = bool(plan.reservation_id) or to_charge > 0
    if plan.reservation_id:
        ctes.append(f"res AS (UPDATE {_q(Reservation._meta.db_table)} SET status = %s, settled_at = %s, "
                    f"usage_record_id = (SELECT id FROM rec) WHERE id = %s AND status = %s RETURNING id)")
        params += [Reservation.Status.SETTLED if charge else Reservation.Status.RELEASED, now, plan.reservation_id,
                   Reservation.Status.HELD]
        # A reconcile may have released the hold already: then there is nothing of it to drop.
        held = "(%s * (SELECT count(*) FROM res))"
        held_params = [plan.reserved]
    else:
        held, held_params = "0", []
    if settles:
        ctes.append(f"acct AS (UPDATE {_q(CreditAccount._meta.db_table)} SET balance = balance - %s, "
                    f"reserved = reserved - {held}, updated_at = %s "
                    f"WHERE user_id = %s AND balance - %s >= reserved - {held} RETURNING id, balance)")
        params += [to_charge, *held_params, now, user_id, to_charge, *held_params]
    if to_charge > 0:
        ctes.append(f"led AS (INSERT INTO {_q(LedgerEntry._meta.db_table)} (account_id, amount, kind, reason, "
                    f"usage_record_id, balance_after, created_at) SELECT acct.id, %s, %s, %s, rec.id, acct.balance, %s "
                    f"FROM acct, rec)")
        params += [-to_charge, LedgerEntry.Kind.CHARGE, f"{outcome.model} ({meta.entry_point})"[:255], now]
    scopes = list(dict.fromkeys(["", project])) if charge else []
    used_tokens = 0 if outcome.cache_hit else record.total_tokens
    counters = _q(UsageCounter._meta.db_table)
    for i, scope in enumerate(scopes):
        ctes.append(f"c{i} AS (INSERT INTO {counters} (user_id, project, period, tokens, cost) "
                    f"VALUES (%s, %s, %s, %s, %s) ON CONFLICT (user_id, project, period) DO UPDATE SET "
                    f"tokens = {counters}.tokens + EXCLUDED.tokens, cost = {counters}.cost + EXCLUDED.cost "
                    f"RETURNING tokens, cost)")
        params += [user_id, scope, plan.period, used_tokens, to_charge]
    if charge and meta.api_key_id:
        keys = _q(ApiKeyCounter._meta.db_table)
        ctes.append(f"kc AS (INSERT INTO {keys} (api_key_id, period, tokens, cost) VALUES (%s, %s, %s, %s) "
                    f"ON CONFLICT (api_key_id, period) DO UPDATE SET tokens = {keys}.tokens + EXCLUDED.tokens, "
                    f"cost = {keys}.cost + EXCLUDED.cost)")
        params += [meta.api_key_id, plan.period, used_tokens, to_charge]
    rollups = _q(DailyRollup._meta.db_table)
    sums = ("calls", "errors", "cache_hits", "prompt_tokens", "completion_tokens", "total_tokens", "cost")
    ctes.append(f"roll AS (INSERT INTO {rollups} (user_id, project, agent_id, provider, model, day, {', '.join(sums)}) "
                f"VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
                f"ON CONFLICT (user_id, project, agent_id, provider, model, day) DO UPDATE SET "
                + ", ".join(f"{c} = {rollups}.{c} + EXCLUDED.{c}" for c in sums) + ")")
    params += [user_id, project, meta.agent_id or 0, record.provider, record.model,
               periods.local_day(record.created_at), 1, int(record.status != UsageRecord.Status.SUCCESS),
               int(record.cached), record.prompt_tokens, record.completion_tokens, record.total_tokens,
               cost if record.charged else ZERO]
    # Not covered (no account row updated): 1/0 aborts the whole statement, so no half-written call survives.
    picks = ["(SELECT id FROM rec)", "1 / (SELECT count(*) FROM acct)::int" if settles else "1"]
    picks += [f"(SELECT tokens FROM c{i}), (SELECT cost FROM c{i})" for i in range(len(scopes))]
    sql = "WITH " + ", ".join(ctes) + " SELECT " + ", ".join(picks)
    return RecordStatement(record=record, sql=sql, params=params, scopes=scopes)


# The record statement's "not covered" signal (division_by_zero): roll back and take the general path.
SLOW_PATH_SQLSTATE = "22012"


def record_saved(record: UsageRecord, record_id: int) -> UsageRecord:
    """The record as if the ORM had saved it; receivers of post_save (model-call metrics) see it."""
    record.pk = record_id
    record._state.adding, record._state.db = False, connection.alias
    post_save.send(sender=UsageRecord, instance=record, created=True, update_fields=None, raw=False,
                   using=connection.alias)
    return record


def _record_call_pg(*, meta: CallMeta, plan: CallPlan, outcome: CallOutcome, cost: Decimal, charge: bool,
                    now: datetime) -> tuple[UsageRecord, list[QuotaAlert]]:
    """record_statement on the ORM connection, in one transaction with any quota alert it raises."""
    stmt = record_statement(meta=meta, plan=plan, outcome=outcome, cost=cost, charge=charge, now=now)
    user_id, record = meta.user_id, stmt.record
    alerts: list[QuotaAlert] = []
    try:
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute(stmt.sql, stmt.params)
                row = cursor.fetchone()
            for i, scope in enumerate(stmt.scopes):
                limit = plan.limits.scopes.get(scope)
                if limit:
                    alert = _maybe_alert(user_id=user_id, project=scope, period=plan.period, limit=limit,
                                         tokens_used=int(row[2 + 2 * i]), cost_used=_dec(row[3 + 2 * i]))
                    if alert:
                        alerts.append(alert)
            record_saved(record, row[0])
    except DataError as exc:
        if getattr(exc.__cause__, "sqlstate", None) == SLOW_PATH_SQLSTATE:
            raise _SlowPath from None  # rolled back
        raise
    return record, alerts


def _ledger_charge(account_id: int, charged: Decimal, balance_after: Decimal, record: UsageRecord, model: str,
                   entry_point: str) -> LedgerEntry:
    return LedgerEntry.objects.create(account_id=account_id, amount=-charged, kind=LedgerEntry.Kind.CHARGE,
                                      reason=f"{model} ({entry_point})"[:255], usage_record=record,
                                      balance_after=balance_after)


def _count(*, meta: CallMeta, plan: CallPlan, outcome: CallOutcome, record: UsageRecord, charged: Decimal,
           counted: bool) -> list[QuotaAlert]:
    """Counters (quota), key counter (budget) and the daily rollup (stats); returns newly raised alerts."""
    user_id, project = meta.user_id, meta.project
    alerts: list[QuotaAlert] = []
    if counted:
        used_tokens = 0 if outcome.cache_hit else record.total_tokens
        for scope in dict.fromkeys(["", project]):
            row = _upsert_add(UsageCounter, {"user_id": user_id, "project": scope, "period": plan.period},
                              {"tokens": used_tokens, "cost": charged}, returning=("tokens", "cost"))
            limit = plan.limits.scopes.get(scope)
            if limit and row:
                alert = _maybe_alert(user_id=user_id, project=scope, period=plan.period, limit=limit,
                                     tokens_used=int(row[0]), cost_used=_dec(row[1]))
                if alert:
                    alerts.append(alert)
        if meta.api_key_id:
            _upsert_add(ApiKeyCounter, {"api_key_id": meta.api_key_id, "period": plan.period},
                        {"tokens": used_tokens, "cost": charged})
    _upsert_add(DailyRollup, {
        "user_id": user_id, "project": project, "agent_id": meta.agent_id or 0, "provider": record.provider,
        "model": record.model, "day": periods.local_day(record.created_at),
    }, {
        "calls": 1, "errors": int(record.status != UsageRecord.Status.SUCCESS), "cache_hits": int(record.cached),
        "prompt_tokens": record.prompt_tokens, "completion_tokens": record.completion_tokens,
        "total_tokens": record.total_tokens, "cost": record.cost if record.charged else ZERO,
    })
    return alerts


def _maybe_alert(*, user_id: int, project: str, period: date, limit: tuple[int, Decimal], tokens_used: int,
                 cost_used: Decimal) -> QuotaAlert | None:
    token_limit, cost_limit = limit
    ratios = []
    if token_limit:
        ratios.append(("tokens", Decimal(tokens_used) / Decimal(token_limit), f"{tokens_used} of {token_limit} tokens"))
    if cost_limit:
        ratios.append(("cost", cost_used / cost_limit, f"{cost_used.normalize():f} of {cost_limit.normalize():f} "
                                                     f"{settings.CURRENCY}"))
    if not ratios:
        return None
    kind, ratio, detail = max(ratios, key=lambda r: r[1])
    if ratio < WARNING_AT:
        return None
    level = QuotaAlert.Level.CRITICAL if ratio >= CRITICAL_AT else QuotaAlert.Level.WARNING
    where = f"project '{project}'" if project else "account"
    message = f"Your {where} has used {int(ratio * 100)}% of its monthly {kind} quota ({detail}) for {period:%Y-%m}."
    if level == QuotaAlert.Level.CRITICAL:
        message += " Further calls are refused until the quota resets."
    # Once per user, project, period and level: the unique constraint decides, so concurrent calls cannot both fire.
    table = _q(QuotaAlert._meta.db_table)
    sql = (f"INSERT INTO {table} (user_id, project, period, level, message, delivered, created_at) "
           f"VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (user_id, project, period, level) DO NOTHING RETURNING id")
    with connection.cursor() as cursor:
        cursor.execute(sql, [user_id, project, connection.ops.adapt_datefield_value(period), level, message, False,
                             connection.ops.adapt_datetimefield_value(timezone.now())])
        row = cursor.fetchone()
    if row is None:
        return None
    return QuotaAlert(pk=row[0], user_id=user_id, project=project, period=period, level=level, message=message)


def _count_late_charge(*, meta: CallMeta, plan: CallPlan, record: UsageRecord, charged: Decimal) -> None:
    """Money charged after record_call (a reconciled hold): into the month's counters and the day's rollup too, so
    quotas see it and the rollups keep agreeing with the records."""
    user_id, project = meta.user_id, meta.project
    for scope in dict.fromkeys(["", project]):
        _upsert_add(UsageCounter, {"user_id": user_id, "project": scope, "period": plan.period},
                    {"tokens": 0, "cost": charged})
    if meta.api_key_id:
        _upsert_add(ApiKeyCounter, {"api_key_id": meta.api_key_id, "period": plan.period},
                    {"tokens": 0, "cost": charged})
    _upsert_add(DailyRollup, {
        "user_id": user_id, "project": project, "agent_id": meta.agent_id or 0, "provider": record.provider,
        "model": record.model, "day": periods.local_day(record.created_at),
    }, {"calls": 0, "errors": 0, "cache_hits": 0, "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0,
        "cost": charged})


def save_pending_result(*, plan: CallPlan, outcome: CallOutcome) -> bool:
    """After a failed record_call: keep the call's outcome on its hold for `reconcile_reservations`."""
    if not plan.reservation_id:
        return False
    return bool(Reservation.objects.filter(pk=plan.reservation_id, status=Reservation.Status.HELD)
                .update(result=outcome.as_json()))


def settle_pending_call(*, meta: CallMeta, plan: CallPlan, outcome: CallOutcome) -> UsageRecord | None:
    """A served call whose record could not be written (database unreachable): record and charge it now, once.

    Retried by `aiwriter.deferred` until the database is back. The hold's row lock and `status = held` make it
    settle once, whoever (this, the sweeper, reconcile) comes first; None when someone else did.
    """
    if not plan.reservation_id:
        record, alerts = record_call(meta=meta, plan=plan, outcome=outcome)
    else:
        with transaction.atomic():
            if not (Reservation.objects.select_for_update()
                    .filter(pk=plan.reservation_id, status=Reservation.Status.HELD).exists()):
                return None
            record, alerts = record_call(meta=meta, plan=plan, outcome=outcome)
    deliver_alerts(alerts)
    return record


# --- Reconcile stale holds ---------------------------------------------------------------------------------------

def _reservation_plan(reservation: Reservation) -> tuple[CallMeta, CallPlan]:
    context = reservation.context
    meta = CallMeta.from_json(context)
    started_at = datetime.fromisoformat(context["started_at"]) if context.get("started_at") else \
        reservation.created_at
    plan = CallPlan(started_at=started_at, period=periods.month_start(started_at),
                    limits=quota_limits(user_id=meta.user_id, project=meta.project),
                    reservation_id=reservation.pk, reserved=reservation.amount)
    return meta, plan


def _charge_saved_result(reservation: Reservation, meta: CallMeta, plan: CallPlan) -> list[QuotaAlert]:
    """The call's outcome was saved on its hold (its record could not be written): write the record, charge it."""
    outcome = CallOutcome(**reservation.result)
    outcome.metadata = {**outcome.metadata, "reconciled": True}
    return record_call(meta=meta, plan=plan, outcome=outcome)[1]


def reconcile_reservations(*, older_than: timedelta = timedelta(hours=1), charge_unknown: bool = False,
                           now: datetime | None = None) -> dict[str, int]:
    """Holds left behind: with a saved outcome, write its record and charge it (at any age: that call is over);
    without one, once older than `older_than`, release it (or, with `charge_unknown`, charge it all).

    Safe to run twice and alongside live calls: each hold is settled once (`status = held` guards every write).
    """
    cutoff = (now or timezone.now()) - older_than
    done = {"charged": 0, "released": 0}
    alerts: list[QuotaAlert] = []
    ids = list(Reservation.objects.filter(Q(created_at__lt=cutoff) | Q(result__isnull=False),
                                          status=Reservation.Status.HELD)
               .order_by("id").values_list("id", flat=True))
    for reservation_id in ids:
        with transaction.atomic():
            reservation = (Reservation.objects.select_for_update(skip_locked=True)
                           .filter(pk=reservation_id, status=Reservation.Status.HELD).first())
            if reservation is None:
                continue
            meta, plan = _reservation_plan(reservation)
            if reservation.result:
                alerts += _charge_saved_result(reservation, meta, plan)
                done["charged"] += 1
            elif reservation.created_at >= cutoff:
                continue  # its outcome was taken back (null) meanwhile: not stale yet
            elif charge_unknown:
                # Outcome unknown: bill the hold itself rather than risk a free call.
                outcome = CallOutcome(status=UsageRecord.Status.ERROR, model=reservation.context.get("model", ""),
                                      billable=False,
                                      token_source=UsageRecord.TokenSource.ESTIMATED, error_code="reconciled_unknown",
                                      metadata={"reconciled": True})
                record, _ = record_call(meta=meta, plan=plan, outcome=outcome)  # releases the hold
                charged, balance_after, account_id = _settle_account(meta.user_id, reservation.amount, ZERO)
                if charged > 0:
                    _ledger_charge(account_id, charged, balance_after, record, outcome.model, "reconcile")
                    record.cost, record.charged = charged, True
                    record.save(update_fields=["cost", "charged"])
                    _count_late_charge(meta=meta, plan=plan, record=record, charged=charged)
                done["charged"] += 1
            else:
                _settle_account(meta.user_id, ZERO, reservation.amount)
                reservation.status, reservation.settled_at = Reservation.Status.RELEASED, timezone.now()
                reservation.save(update_fields=["status", "settled_at"])
                done["released"] += 1
    deliver_alerts(alerts)
    return done


def settle_abandoned_calls(*, message_id: int, prompt_tokens: int, delivered: str) -> list[UsageRecord]:
    """Holds of calls whose worker died mid-stream (the sweeper found their reply stuck in `processing`).

    A hold with its call's outcome saved on it is charged that outcome. Any other gets its usage record now:
    prompt + the text that arrived (checkpointed on the reply), estimated and billed as partial like any cut-off
    stream; the rest of the hold is released. Safe to run twice.
    """
    records = []
    ids = list(Reservation.objects.filter(status=Reservation.Status.HELD, context__message_id=message_id)
               .values_list("id", flat=True))
    for reservation_id in ids:
        with transaction.atomic():
            reservation = (Reservation.objects.select_for_update(skip_locked=True)
                           .filter(pk=reservation_id, status=Reservation.Status.HELD).first())
            if reservation is None:
                continue
            meta, plan = _reservation_plan(reservation)
            if reservation.result:  # the call ended and its outcome is known: that, not an estimate
                alerts = _charge_saved_result(reservation, meta, plan)
                records.append(UsageRecord.objects.get(pk=Reservation.objects.values_list(
                    "usage_record_id", flat=True).get(pk=reservation.pk)))
                deliver_alerts(alerts)
                continue
            model = reservation.context.get("model", "")
            completion = tokens.count_text(delivered, model)
            outcome = CallOutcome(status=UsageRecord.Status.ERROR, model=model, prompt_tokens=prompt_tokens,
                                  completion_tokens=completion, billable=completion > 0,
                                  token_source=UsageRecord.TokenSource.PARTIAL if completion else
                                  UsageRecord.TokenSource.ESTIMATED, error_code="worker_lost",
                                  metadata={"swept": True})
            record, alerts = record_call(meta=meta, plan=plan, outcome=outcome)
        deliver_alerts(alerts)
        records.append(record)
    return records


# --- Consumption reported by trusted services (seed 000's ConsumeQuota) -------------------------------------------

@dataclass
class _ExternalContext:
    user: Any
    entry_point: str = UsageRecord.EntryPoint.EXTERNAL
    api_key: Any = None
    project: str = ""
    agent: Any = None
    conversation: Any = None
    message: Any = None
    debug: bool = False
    workflow_type: str = ""
    idempotency_key: str | None = None


def _request_hash(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def record_consumption(*, caller: AbstractBaseUser, user: AbstractBaseUser, workflow_type: str, tokens_used: int,
                       idempotency_key: str, model: str = "", metadata: dict[str, Any] | None = None,
                       project: str = "", now: datetime | None = None) -> tuple[dict[str, Any], bool]:
    """Records tokens another service spent for `user`, once per idempotency key; returns (response, created).

    The tokens are priced as output at the model's price in force (free without a model) and charged up to the
    free balance: the tokens are already spent, so the record is never refused. Same key, other body: 409.
    """
    metadata = metadata or {}
    body = {"user": user.get_username(), "workflow_type": workflow_type, "tokens_used": tokens_used,
            "model": model, "metadata": metadata, "project": project}
    digest = _request_hash(body)
    with transaction.atomic():
        try:
            with transaction.atomic():
                key, created = IdempotencyKey.objects.get_or_create(
                    scope="consume", user=caller, key=idempotency_key, defaults={"request_hash": digest})
        except IntegrityError:  # lost a race on a backend without blocking inserts: the winner's row is there
            key, created = IdempotencyKey.objects.get(scope="consume", user=caller, key=idempotency_key), False
        if not created:
            if key.request_hash != digest:
                raise Conflict("This idempotency key was used with a different request.",
                               code="idempotency_key_reused")
            return key.response or {}, False
        ctx = _ExternalContext(user=user, project=project, workflow_type=workflow_type,
                               idempotency_key=f"consume:{caller.pk}:{idempotency_key}")
        started_at = now or timezone.now()
        plan = CallPlan(started_at=started_at, period=periods.month_start(started_at),
                        limits=quota_limits(user_id=user.pk, project=project))
        outcome = CallOutcome(status=UsageRecord.Status.SUCCESS, model=model, completion_tokens=tokens_used,
                              token_source=UsageRecord.TokenSource.MEASURED, metadata=metadata)
        if model:
            ensure_account(user)
        record, alerts = record_call(meta=call_meta(ctx), plan=plan, outcome=outcome)
        response = {"id": record.pk, "user": user.get_username(), "workflow_type": workflow_type,
                    "tokens_used": tokens_used, "model": model, "cost": format(record.cost.normalize(), "f"),
                    "charged": record.charged, "idempotency_key": idempotency_key,
                    "created_at": record.created_at.isoformat(),
                    # Already spent, so recorded regardless; this tells the caller to stop its user's work.
                    "quota_exceeded": _over_quota(user_id=user.pk, project=project, period=plan.period,
                                                  limits=plan.limits)}
        key.response = response
        key.save(update_fields=["response"])
    deliver_alerts(alerts)
    return response, True


def deliver_alerts(alerts: list[QuotaAlert]) -> None:
    """Sends alerts by email and webhook once the surrounding transaction (if any) commits, never inside it."""
    if not alerts:
        return
    from usage.alerts import deliver

    for alert in alerts:
        transaction.on_commit(lambda alert=alert: deliver(alert), robust=True)


# --- Repair: rebuild the daily rollups from the records ----------------------------------------------------------

def rebuild_rollups(*, start: date, end: date) -> int:
    """Recomputes DailyRollup for local days start..end from the raw records; returns the number of rows.

    Safe alongside live traffic on PostgreSQL: the rollup table is locked for the rebuild, so a call recorded
    meanwhile adds its increment after the rebuild rather than being counted twice or lost.
    """
    from django.db.models import Count, Q, Sum
    from django.db.models.functions import Coalesce, TruncDate

    with transaction.atomic():
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute(f"LOCK TABLE {_q(DailyRollup._meta.db_table)} IN EXCLUSIVE MODE")
        DailyRollup.objects.filter(day__gte=start, day__lte=end).delete()
        rows = (
            UsageRecord.objects.filter(debug=False, created_at__gte=periods.day_start(start),
                                       created_at__lt=periods.day_start(end + timedelta(days=1)))
            .annotate(day_local=TruncDate("created_at", tzinfo=periods.quota_zone()),
                      agent_key=Coalesce("agent_id", 0))
            .order_by()
            .values("user_id", "project", "agent_key", "provider", "model", "day_local")
            .annotate(n=Count("id"), n_errors=Count("id", filter=~Q(status=UsageRecord.Status.SUCCESS)),
                      n_hits=Count("id", filter=Q(cached=True)), p=Sum("prompt_tokens"),
                      c=Sum("completion_tokens"), t=Sum("total_tokens"), money=Sum("cost", filter=Q(charged=True)))
        )
        rollups = [DailyRollup(user_id=r["user_id"], project=r["project"], agent_id=r["agent_key"],
                               provider=r["provider"], model=r["model"], day=r["day_local"], calls=r["n"],
                               errors=r["n_errors"], cache_hits=r["n_hits"], prompt_tokens=r["p"] or 0,
                               completion_tokens=r["c"] or 0, total_tokens=r["t"] or 0,
                               cost=quantize(r["money"] or ZERO)) for r in rows]
        DailyRollup.objects.bulk_create(rollups, batch_size=1000)
    return len(rollups)
