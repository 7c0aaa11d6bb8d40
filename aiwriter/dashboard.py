"""The operators' dashboard in the admin: traffic, tokens, cost and errors over time, top spenders,
cache hit rate, deployment health. Charts are SVG drawn here, server-side (aiwriter.charts)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.contrib import admin
from django.contrib.auth import get_user_model
from django.db.models import Avg, Count, Q, Sum
from django.db.models.functions import Coalesce, TruncDay, TruncHour
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.utils import timezone

from agents.selectors import deployment_health
from aiwriter import charts
from aiwriter.money import money_str
from usage.models import ApiKey, UsageRecord

RANGES = {"1": ("Last 24 hours", timedelta(hours=24)), "7": ("Last 7 days", timedelta(days=7)),
          "30": ("Last 30 days", timedelta(days=30)), "90": ("Last 90 days", timedelta(days=90))}
TOP_N = 8


@dataclass
class Bucket:
    start: datetime
    requests: int = 0
    errors: int = 0
    cache_hits: int = 0
    tokens: int = 0
    cost: Decimal = Decimal("0")

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


def _buckets(start: datetime, end: datetime, hourly: bool) -> list[Bucket]:
    """Every hour/day in the range, including empty ones, so the x axis is continuous."""
    tz = timezone.get_current_timezone()
    step = timedelta(hours=1) if hourly else timedelta(days=1)
    cursor = start.astimezone(tz).replace(minute=0, second=0, microsecond=0)
    if not hourly:
        cursor = cursor.replace(hour=0)
    buckets = []
    while cursor <= end:
        buckets.append(Bucket(start=cursor))
        cursor += step
    return buckets


def usage_over_time(start: datetime, end: datetime, *, hourly: bool) -> list[Bucket]:
    trunc = TruncHour("created_at") if hourly else TruncDay("created_at")
    rows = (UsageRecord.objects.filter(created_at__gte=start, created_at__lte=end, debug=False)
            .annotate(bucket=trunc).values("bucket")
            .annotate(requests=Count("id"), errors=Count("id", filter=Q(status=UsageRecord.Status.ERROR)),
                      cache_hits=Count("id", filter=Q(cached=True)),
                      tokens=Coalesce(Sum("total_tokens"), 0), cost=Coalesce(Sum("cost"), Decimal("0")))
            .order_by("bucket"))
    buckets = _buckets(start, end, hourly)
    by_start = {b.start: b for b in buckets}
    for row in rows:
        bucket = by_start.get(row["bucket"])
        if bucket is None:  # a record on the range's edge
            continue
        bucket.requests, bucket.errors, bucket.cache_hits = row["requests"], row["errors"], row["cache_hits"]
        bucket.tokens, bucket.cost = row["tokens"], row["cost"]
    return buckets


def top_by_cost(start: datetime, field: str, limit: int = TOP_N) -> list[tuple[str, Decimal]]:
    rows = (UsageRecord.objects.filter(created_at__gte=start, debug=False).values(field)
            .annotate(total=Sum("cost")).filter(total__gt=0).order_by("-total")[:limit])
    if field == "user":
        names = dict(get_user_model().objects.filter(pk__in=[r["user"] for r in rows])
                     .values_list("pk", get_user_model().USERNAME_FIELD))
        return [(names.get(r["user"], f"#{r['user']}"), r["total"]) for r in rows]
    return [(r[field] or "—", r["total"]) for r in rows]


PERCENTILES = (50, 95, 99)


def latency_percentiles(start: datetime, end: datetime) -> dict[str, int | None]:
    """p50/p95/p99 of call latency (nearest rank) over the range; upstream calls only (no cache hits, no debug).
    Three indexed OFFSET reads rather than loading every latency (portable: SQLite has no percentile function)."""
    latencies = (UsageRecord.objects.filter(created_at__gte=start, created_at__lte=end, debug=False, cached=False,
                                            latency_ms__isnull=False)
                 .order_by("latency_ms").values_list("latency_ms", flat=True))
    count = latencies.count()
    result: dict[str, int | None] = {}
    for p in PERCENTILES:
        result[f"p{p}"] = latencies[max(0, math.ceil(count * p / 100) - 1)] if count else None
    return result


@dataclass
class Breakdown:
    name: str
    requests: int
    errors: int
    tokens: int
    cost: Decimal
    avg_latency_ms: float | None

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def cost_display(self) -> str:
        return money_str(self.cost)


def breakdown(start: datetime, end: datetime, field: str, limit: int = 20) -> list[Breakdown]:
    """Per model or per API key over the range, by cost then requests (top `limit`)."""
    rows = (UsageRecord.objects.filter(created_at__gte=start, created_at__lte=end, debug=False).values(field)
            .annotate(requests=Count("id"), errors=Count("id", filter=Q(status=UsageRecord.Status.ERROR)),
                      tokens=Coalesce(Sum("total_tokens"), 0), cost=Coalesce(Sum("cost"), Decimal("0")),
                      latency=Avg("latency_ms", filter=Q(cached=False)))
            .order_by("-cost", "-requests")[:limit])
    names: dict = {}
    if field == "api_key":
        names = {k.pk: f"{k.name} ({k.prefix}…)" for k in
                 ApiKey.objects.filter(pk__in=[r["api_key"] for r in rows if r["api_key"]])}
    result = []
    for r in rows:
        if field == "api_key":
            name = names.get(r["api_key"], f"#{r['api_key']}") if r["api_key"] else "(no key: chat page)"
        else:
            name = r[field] or "—"
        result.append(Breakdown(name=name, requests=r["requests"], errors=r["errors"], tokens=r["tokens"],
                                cost=r["cost"], avg_latency_ms=r["latency"]))
    return result


def dashboard_view(request: HttpRequest) -> HttpResponse:
    range_key = request.GET.get("range", "7")
    if range_key not in RANGES:
        range_key = "7"
    range_label, span = RANGES[range_key]
    hourly = range_key == "1"
    end = timezone.now()
    start = end - span
    buckets = usage_over_time(start, end, hourly=hourly)
    labels = [timezone.localtime(b.start).strftime("%H:00" if hourly else "%m-%d") for b in buckets]
    totals = Bucket(start=start)
    for b in buckets:
        totals.requests += b.requests
        totals.errors += b.errors
        totals.cache_hits += b.cache_hits
        totals.tokens += b.tokens
        totals.cost += b.cost
    currency = settings.CURRENCY
    context = {
        **admin.site.each_context(request),
        "title": "Dashboard",
        "ranges": [(key, label) for key, (label, _) in RANGES.items()],
        "range_key": range_key,
        "range_label": range_label,
        "totals": totals,
        "cache_hit_rate": totals.cache_hits / totals.requests if totals.requests else 0.0,
        "total_cost": money_str(totals.cost),
        "latency": latency_percentiles(start, end),
        "breakdowns": [("By model", breakdown(start, end, "model"), "by-model"),
                       ("By API key", breakdown(start, end, "api_key"), "by-key")],
        "currency": currency,
        "time_zone": settings.TIME_ZONE,
        "charts": {
            "requests": charts.line_chart(labels, {"requests": [b.requests for b in buckets],
                                                   "errors": [b.errors for b in buckets]},
                                          title="Requests", y_label="calls"),
            "tokens": charts.line_chart(labels, {"tokens": [b.tokens for b in buckets]},
                                        title="Tokens", y_label="tokens"),
            "cost": charts.line_chart(labels, {"cost": [b.cost for b in buckets]},
                                      title=f"Cost ({currency})", y_label=currency),
            "error_rate": charts.line_chart(labels, {"error rate": [b.error_rate for b in buckets],
                                                     "cache hit rate": [b.cache_hits / b.requests if b.requests else 0
                                                                        for b in buckets]},
                                            title="Error rate and cache hit rate", y_label="share of calls",
                                            fmt=charts.percent, tip=charts.percent),
            "top_users": charts.bar_chart(top_by_cost(start, "user"), title=f"Top users by cost ({currency})",
                                          fmt=charts.money),
            "top_models": charts.bar_chart(top_by_cost(start, "model"), title=f"Top models by cost ({currency})",
                                           fmt=charts.money),
        },
        "deployments": deployment_health(),  # from the shared store after a restart; breakers are this process's
    }
    return TemplateResponse(request, "admin/dashboard.html", context)


dashboard = admin.site.admin_view(dashboard_view)
