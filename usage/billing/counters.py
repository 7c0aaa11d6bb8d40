"""Counters (quota), key counters (budget) and daily rollups (stats), quota alerts, and the rollup repair.

The increments are defined once (`call_upserts`): executed one by one on the general path, and as CTEs of the
one-statement PostgreSQL record (usage.billing.recording.record_statement)."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal
from functools import partial
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Model, Q
from django.utils import timezone

from aiwriter.db import vendor as db_vendor
from aiwriter.money import ZERO, quantize
from usage import periods
from usage.billing.calls import CallMeta, CallPlan
from usage.billing.sql import _dec, _num, _q
from usage.models import ApiKeyCounter, DailyRollup, QuotaAlert, UsageCounter, UsageRecord

logger = logging.getLogger(__name__)

WARNING_AT = Decimal("0.9")
CRITICAL_AT = Decimal("1")


@dataclass(frozen=True)
class Upsert:
    """One increment: INSERT … ON CONFLICT (keys) DO UPDATE SET col = col + EXCLUDED.col [RETURNING …]."""

    model: type[Model]
    keys: dict[str, Any]
    adds: dict[str, Any]
    returning: tuple[str, ...] = ()

    def sql(self) -> tuple[str, list[Any]]:
        """The statement and its parameters, for either backend (numbers and dates as both compare them)."""
        values = [*self.keys.values(), *self.adds.values()]
        numeric = tuple(isinstance(value, Decimal) for value in values)
        params = [_num(value) if is_number else _date_param(value)
                  for value, is_number in zip(values, numeric, strict=True)]
        return _upsert_sql(self.model, tuple(self.keys), tuple(self.adds), self.returning, numeric), params

    def execute(self) -> tuple[Any, ...] | None:
        sql, params = self.sql()
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchone() if self.returning else None


def _date_param(value: Any) -> Any:
    if isinstance(value, date) and not isinstance(value, datetime):
        return value if db_vendor() == "postgresql" else str(value)  # as the backend's adapt_datefield_value
    return value


@functools.cache
def _upsert_sql(model: type[Model], keys: tuple[str, ...], adds: tuple[str, ...], returning: tuple[str, ...],
                numeric: tuple[bool, ...]) -> str:
    """An upsert's text, built once per shape: the hot path writes the same few on every call."""
    table = _q(model._meta.db_table)
    values = ", ".join("CAST(%s AS NUMERIC)" if is_number else "%s" for is_number in numeric)
    sets = ", ".join(f"{_q(c)} = {table}.{_q(c)} + EXCLUDED.{_q(c)}" for c in adds)
    sql = (f"INSERT INTO {table} ({', '.join(_q(c) for c in (*keys, *adds))}) VALUES ({values}) "
           f"ON CONFLICT ({', '.join(_q(c) for c in keys)}) DO UPDATE SET {sets}")
    if returning:
        sql += " RETURNING " + ", ".join(_q(c) for c in returning)
    return sql


def quota_scopes(meta: CallMeta) -> list[str]:
    """The month counters a call adds to: the account's ("") and its project's."""
    return list(dict.fromkeys(["", meta.project]))


def counter_upserts(*, meta: CallMeta, period: date, tokens: int, cost: Decimal) -> list[Upsert]:
    """The month counters (one per quota scope, returning their new totals for the alerts, in `quota_scopes`
    order), then the key's counter (its budget)."""
    upserts = [Upsert(UsageCounter, {"user_id": meta.user_id, "project": scope, "period": period},
                      {"tokens": tokens, "cost": cost}, returning=("tokens", "cost")) for scope in quota_scopes(meta)]
    if meta.api_key_id:
        upserts.append(Upsert(ApiKeyCounter, {"api_key_id": meta.api_key_id, "period": period},
                              {"tokens": tokens, "cost": cost}))
    return upserts


def rollup_upsert(*, meta: CallMeta, record: UsageRecord, calls: int, cost: Decimal) -> Upsert:
    """The day's rollup row of the record's user, project, agent, provider and model. `calls` 0: money only (a
    late charge); 1: the record itself, its tokens and outcome."""
    keys = {"user_id": meta.user_id, "project": meta.project, "agent_id": meta.agent_id or 0,
            "provider": record.provider, "model": record.model, "day": periods.local_day(record.created_at)}
    adds = {"calls": calls, "errors": calls and int(record.status != UsageRecord.Status.SUCCESS),
            "cache_hits": calls and int(record.cached), "prompt_tokens": calls and record.prompt_tokens,
            "completion_tokens": calls and record.completion_tokens, "total_tokens": calls and record.total_tokens,
            "cost": cost}
    return Upsert(DailyRollup, keys, adds)


def call_upserts(*, meta: CallMeta, plan: CallPlan, record: UsageRecord, charged: Decimal,
                 counted: bool) -> list[Upsert]:
    """What a recorded call adds: when counted (charged calls), the month counters and the key's counter; always
    the day's rollup. The one definition for both the general path (`_count`) and the one-statement record."""
    upserts = []
    if counted:
        used_tokens = 0 if record.cached else record.total_tokens
        upserts = counter_upserts(meta=meta, period=plan.period, tokens=used_tokens, cost=charged)
    upserts.append(rollup_upsert(meta=meta, record=record, calls=1, cost=record.cost if record.charged else ZERO))
    return upserts


def _count(*, meta: CallMeta, plan: CallPlan, record: UsageRecord, charged: Decimal,
           counted: bool) -> list[QuotaAlert]:
    """Counters (quota), key counter (budget) and the daily rollup (stats); returns newly raised alerts."""
    alerts: list[QuotaAlert] = []
    for upsert in call_upserts(meta=meta, plan=plan, record=record, charged=charged, counted=counted):
        row = upsert.execute()
        if upsert.model is UsageCounter and row:
            scope = upsert.keys["project"]
            limit = plan.limits.scopes.get(scope)
            if limit:
                alert = _maybe_alert(user_id=meta.user_id, project=scope, period=plan.period, limit=limit,
                                     tokens_used=int(row[0]), cost_used=_dec(row[1]))
                if alert:
                    alerts.append(alert)
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
    for upsert in [*counter_upserts(meta=meta, period=plan.period, tokens=0, cost=charged),
                   rollup_upsert(meta=meta, record=record, calls=0, cost=charged)]:
        upsert.execute()


def deliver_alerts(alerts: list[QuotaAlert]) -> None:
    """Sends alerts by email and webhook once the surrounding transaction (if any) commits, never inside it."""
    if not alerts:
        return
    from usage.alerts import deliver

    for alert in alerts:
        transaction.on_commit(partial(deliver, alert), robust=True)


# --- Repair: rebuild the daily rollups from the records ----------------------------------------------------------

def rebuild_rollups(*, start: date, end: date) -> int:
    """Recomputes DailyRollup for local days start..end from the raw records; returns the number of rows.

    Safe alongside live traffic on PostgreSQL: the rollup table is locked for the rebuild, so a call recorded
    meanwhile adds its increment after the rebuild rather than being counted twice or lost.
    """
    from django.db.models import Count, Sum
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
