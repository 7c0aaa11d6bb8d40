"""Reads for the usage app: limits and counters (hot path), stats, records, quota status, balance, ledger."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db.models import Count, Q, QuerySet, Sum
from django.db.models.functions import Coalesce, TruncDate

from agents.models import LLMModel
from aiwriter.money import ZERO, money_str, quantize, to_cents
from usage import periods
from usage.models import CreditAccount, DailyRollup, LedgerEntry, Quota, QuotaAlert, UsageCounter, UsageRecord


@dataclass
class Limits:
    """Monthly (token limit, cost limit) per scope: "" is the whole account, other keys are projects. 0 = none."""

    scopes: dict[str, tuple[int, Decimal]] = field(default_factory=dict)

    @property
    def any(self) -> bool:
        return any(t or c for t, c in self.scopes.values())


def quota_limits(*, user_id: int, project: str = "") -> Limits:
    """The account's limits (its Quota row, else the settings defaults) and the project's, if it has a row."""
    return limits_from_rows({p: (t, c) for p, t, c in Quota.objects.filter(user_id=user_id, project__in={"", project})
                             .values_list("project", "monthly_token_limit", "monthly_cost_limit")})


def limits_from_rows(rows: dict[str, tuple[Any, Any]]) -> Limits:
    """Limits from the Quota rows (project -> (token limit, cost limit)) of the account ("") and the project."""
    rows = dict(rows)
    scopes = {"": rows.pop("", (settings.DEFAULT_MONTHLY_TOKEN_LIMIT, settings.DEFAULT_MONTHLY_COST_LIMIT))}
    scopes.update(rows)
    return Limits(scopes={k: (int(t), quantize(Decimal(c))) for k, (t, c) in scopes.items()})


def month_counters(*, user_id: int, period: date, projects: Iterable[str]) -> dict[str, tuple[int, Decimal]]:
    return {p: (t, c) for p, t, c in UsageCounter.objects.filter(user_id=user_id, period=period, project__in=projects)
            .values_list("project", "tokens", "cost")}


# --- Quota status -------------------------------------------------------------------------------------------------

def _percent(used: Decimal, limit: Decimal) -> float | None:
    # A display ratio, not money: two decimals are plenty and JSON numbers are expected here.
    return round(float(used / limit * 100), 2) if limit else None


def quota_status(*, user: Any, project: str = "", now: datetime | None = None) -> dict[str, Any]:
    period = periods.month_start(now)
    limits = quota_limits(user_id=user.pk, project=project)
    scope = project if project in limits.scopes else ""
    token_limit, cost_limit = limits.scopes[scope]
    tokens_used, cost_used = month_counters(user_id=user.pk, period=period, projects=[scope]).get(scope, (0, ZERO))
    pct_tokens = _percent(Decimal(tokens_used), Decimal(token_limit))
    pct_cost = _percent(cost_used, cost_limit)
    exceeded = bool((token_limit and tokens_used >= token_limit) or (cost_limit and cost_used >= cost_limit))
    alert = (QuotaAlert.objects.filter(user=user, project=scope, period=period)
             .order_by("level").values("level", "message").first())  # "critical" < "warning": the worst first
    return {
        "period": {"start": period.isoformat(), "end": periods.next_month(period).isoformat(),
                   "time_zone": settings.QUOTA_TIME_ZONE},
        "project": scope,
        "exceeded": exceeded,
        "usage": {"tokens": tokens_used, "cost": money_str(cost_used)},
        "limits": {"tokens": token_limit or None, "cost": money_str(cost_limit) if cost_limit else None},
        "percentage": {"tokens": pct_tokens, "cost": pct_cost},
        "alert": alert,
    }


# --- Records and stats --------------------------------------------------------------------------------------------

@dataclass
class UsageFilter:
    user_id: int | None = None
    start: date | None = None  # local days in QUOTA_TIME_ZONE, both inclusive
    end: date | None = None
    project: str | None = None
    agent_id: int | None = None
    model: str | None = None
    provider: str | None = None


def usage_records(flt: UsageFilter) -> QuerySet[UsageRecord]:
    qs = UsageRecord.objects.filter(debug=False)
    if flt.user_id is not None:
        qs = qs.filter(user_id=flt.user_id)
    if flt.start:
        qs = qs.filter(created_at__gte=periods.day_start(flt.start))
    if flt.end:
        qs = qs.filter(created_at__lt=_day_after(flt.end))
    if flt.project is not None:
        qs = qs.filter(project=flt.project)
    if flt.agent_id is not None:
        qs = qs.filter(agent_id=flt.agent_id)
    if flt.model:
        qs = qs.filter(model=flt.model)
    if flt.provider:
        qs = qs.filter(provider=flt.provider)
    return qs.order_by("-created_at", "-id")


def _day_after(day: date) -> datetime:
    return periods.day_start(day + timedelta(days=1))


def _rollups(flt: UsageFilter) -> QuerySet[DailyRollup]:
    qs = DailyRollup.objects.all()
    if flt.user_id is not None:
        qs = qs.filter(user_id=flt.user_id)
    if flt.start:
        qs = qs.filter(day__gte=flt.start)
    if flt.end:
        qs = qs.filter(day__lte=flt.end)
    if flt.project is not None:
        qs = qs.filter(project=flt.project)
    if flt.agent_id is not None:
        qs = qs.filter(agent_id=flt.agent_id)
    if flt.model:
        qs = qs.filter(model=flt.model)
    if flt.provider:
        qs = qs.filter(provider=flt.provider)
    return qs


_TOTALS = ("calls", "errors", "cache_hits", "prompt_tokens", "completion_tokens", "total_tokens", "cost")
GROUPS = {"provider": "provider", "model": "model", "day": "day", "project": "project", "agent": "agent_id"}


def _totals_row(row: dict[str, Any]) -> dict[str, Any]:
    cost = quantize(Decimal(row.get("cost") or 0))
    out = {k: int(row.get(k) or 0) for k in _TOTALS if k != "cost"}
    out["cost"] = money_str(cost)
    out["cost_cents"] = to_cents(cost)
    return out


def usage_stats(flt: UsageFilter, *, group_by: Iterable[str] = ("provider", "model", "day"),
                source: str = "rollup") -> dict[str, Any]:
    """Totals and groups; answered from DailyRollup (`source="records"` sums raw records, for checks)."""
    if source == "rollup":
        qs = _rollups(flt)
        sums = {k: Coalesce(Sum(k), 0) if k != "cost" else Sum("cost") for k in _TOTALS}
    else:
        qs = usage_records(flt).order_by().annotate(day=TruncDate("created_at", tzinfo=periods.quota_zone()))
        sums = {
            "calls": Count("id"),
            "errors": Count("id", filter=~Q(status=UsageRecord.Status.SUCCESS)),
            "cache_hits": Count("id", filter=Q(cached=True)),
            "prompt_tokens": Coalesce(Sum("prompt_tokens"), 0),
            "completion_tokens": Coalesce(Sum("completion_tokens"), 0),
            "total_tokens": Coalesce(Sum("total_tokens"), 0),
            "cost": Sum("cost", filter=Q(charged=True)),
        }
    result: dict[str, Any] = {"totals": _totals_row(qs.aggregate(**sums)), "currency": settings.CURRENCY}
    for name in group_by:
        column = GROUPS.get(name)
        if column is None:
            continue
        if source != "rollup" and column == "agent_id":
            column_qs = qs.annotate(agent_key=Coalesce("agent_id", 0))
            rows = column_qs.values("agent_key").annotate(**sums).order_by("agent_key")
            key = "agent_key"
        else:
            rows = qs.values(column).annotate(**sums).order_by(column)
            key = column
        result[f"by_{name}"] = [
            {name: (row[key].isoformat() if isinstance(row[key], date) else row[key]), **_totals_row(row)}
            for row in rows
        ]
    return result


def cache_hit_rate(flt: UsageFilter) -> dict[str, Any]:
    row = _rollups(flt).aggregate(calls=Coalesce(Sum("calls"), 0), hits=Coalesce(Sum("cache_hits"), 0))
    calls, hits = int(row["calls"]), int(row["hits"])
    return {"calls": calls, "cache_hits": hits, "hit_rate": round(hits / calls, 4) if calls else 0.0}


# --- Balance and ledger -------------------------------------------------------------------------------------------

def balance(*, user: Any) -> dict[str, Any]:
    account = CreditAccount.objects.filter(user=user).values("balance", "reserved").first() or {
        "balance": ZERO, "reserved": ZERO}
    return {"balance": money_str(account["balance"]), "reserved": money_str(account["reserved"]),
            "available": money_str(account["balance"] - account["reserved"]), "currency": settings.CURRENCY}


def ledger_entries(*, user: Any) -> QuerySet[LedgerEntry]:
    return LedgerEntry.objects.filter(account__user=user).order_by("-created_at", "-id")


def model_exists(name: str) -> bool:
    return LLMModel.objects.filter(name=name).exists()
