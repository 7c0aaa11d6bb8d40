"""Reads for the AI service layer: prices in force, deployment health, service metrics (API and admin dashboard)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db.models import Avg, Count, Max, Prefetch, Q, QuerySet, Sum
from django.utils import timezone

from agents.llm import breaker, cache, health, metrics
from agents.models import Agent, Deployment, LLMModel, Provider
from aiwriter.money import money_str
from usage.models import ModelPrice, UsageRecord


def current_price(model: LLMModel | int, *, at: datetime | None = None) -> ModelPrice | None:
    """The price row in force at `at` (default now): the latest with effective_from <= at."""
    model_id = model if isinstance(model, int) else model.pk
    return (ModelPrice.objects.filter(model_id=model_id, effective_from__lte=at or timezone.now())
            .order_by("-effective_from", "-id").first())


def provider_list() -> QuerySet[Provider]:
    return Provider.objects.all()


def model_list() -> QuerySet[LLMModel]:
    """Models with their deployments and price rows in force, prefetched (see `prefetched_price`)."""
    prices = ModelPrice.objects.filter(effective_from__lte=timezone.now()).order_by("-effective_from", "-id")
    return LLMModel.objects.prefetch_related(
        Prefetch("deployments", queryset=Deployment.objects.select_related("provider").order_by("id")),
        Prefetch("prices", queryset=prices, to_attr="prices_in_force"),
    )


def prefetched_price(model: LLMModel) -> ModelPrice | None:
    rows = getattr(model, "prices_in_force", None)
    if rows is None:
        return current_price(model)
    return rows[0] if rows else None


def agent_list() -> QuerySet[Agent]:
    return Agent.objects.select_related("model", "fallback_model")


@dataclass(frozen=True)
class DeploymentHealth:
    """One deployment's health: live status (traffic, breaker, probe), latency, error rate, last check."""

    deployment_id: int
    model: str
    provider: str
    upstream_model: str
    enabled: bool  # the deployment, its provider and its model all enabled
    status: str  # health.HEALTHY / DEGRADED / UNHEALTHY / UNKNOWN, or "disabled"
    breaker_state: str
    healthy: bool  # takes traffic
    response_time_ms: int | None
    error_rate: float
    recent_calls: int
    last_error: str
    last_check: datetime | None
    probe_status: str

    @property
    def breaker(self) -> str:  # the admin dashboard's name for it
        return self.breaker_state

    def as_json(self) -> dict[str, Any]:
        """The row of GET /api/health (public: keeps the aliases `breaker` and `state`)."""
        return {
            "deployment_id": self.deployment_id, "model": self.model, "provider": self.provider,
            "upstream_model": self.upstream_model, "enabled": self.enabled, "status": self.status,
            "breaker_state": self.breaker_state, "breaker": self.breaker_state, "state": self.breaker_state,
            "healthy": self.healthy, "response_time_ms": self.response_time_ms, "error_rate": self.error_rate,
            "recent_calls": self.recent_calls, "last_error": self.last_error,
            "last_check": self.last_check.isoformat() if self.last_check else None,
            "probe_status": self.probe_status,
        }


# How far back the stored traffic (usage records, shared by every process) speaks for a deployment's health.
STORED_TRAFFIC_WINDOW = timedelta(minutes=15)


@dataclass(frozen=True)
class StoredTraffic:
    calls: int
    errors: int
    latency_ms: int | None
    last_at: datetime
    last_error: str

    @property
    def error_rate(self) -> float:
        return self.errors / self.calls if self.calls else 0.0

    def status(self) -> str:
        """The live-traffic rule of agents.llm.health, over the calls every process recorded."""
        if self.calls >= health.MIN_SAMPLES:
            if self.error_rate >= settings.LLM_UNHEALTHY_ERROR_RATE:
                return health.UNHEALTHY
            if self.error_rate >= settings.LLM_DEGRADED_ERROR_RATE or \
                    (self.latency_ms or 0) > settings.LLM_SLOW_LATENCY_MS:
                return health.DEGRADED
            return health.HEALTHY
        return health.HEALTHY if self.errors == 0 else health.DEGRADED


def stored_traffic(since: datetime | None = None) -> dict[tuple[str, str, str], StoredTraffic]:
    """Recent upstream calls per (provider, model, upstream model) from the usage records: what a restarted
    process (or another worker) knows without its own in-memory window. Cache hits never reached upstream."""
    since = since or timezone.now() - STORED_TRAFFIC_WINDOW
    recent = UsageRecord.objects.filter(created_at__gte=since, cached=False).exclude(provider="")
    error = Q(status=UsageRecord.Status.ERROR)
    rows = (recent.values("provider", "model", "upstream_model")
            .annotate(calls=Count("id"), errors=Count("id", filter=error),
                      latency=Avg("latency_ms", filter=~error), last_at=Max("created_at")))
    last_errors = {}
    for r in recent.filter(error).order_by("created_at").values("provider", "model", "upstream_model", "error_code"):
        last_errors[(r["provider"], r["model"], r["upstream_model"])] = r["error_code"]
    return {
        (r["provider"], r["model"], r["upstream_model"]): StoredTraffic(
            calls=r["calls"], errors=r["errors"], latency_ms=int(r["latency"]) if r["latency"] is not None else None,
            last_at=r["last_at"], last_error=last_errors.get((r["provider"], r["model"], r["upstream_model"]), ""))
        for r in rows
    }


def deployment_health(*, provider_id: int | None = None) -> list[DeploymentHealth]:
    """One row per deployment, by model name. This process's live window when it has one; otherwise the shared
    store: recent usage records (every process writes them) or the stored probe, whichever is newer. So a
    restart doesn't reset health to "unknown". Breaker state is this process's."""
    deployments = Deployment.objects.select_related("model", "provider").order_by("model__name", "id")
    if provider_id is not None:
        deployments = deployments.filter(provider_id=provider_id)
    stored = stored_traffic()
    rows = []
    for d in deployments:
        window = health.window(d.pk)
        if window is not None and not window.calls:
            window = None
        traffic = None if window else stored.get((d.provider.name, d.model.name, d.upstream_model))
        if traffic is not None and d.last_check_at is not None and d.last_check_at > traffic.last_at:
            traffic = None  # the probe is newer
        live_at = (datetime.fromtimestamp(window.last_at, tz=timezone.get_current_timezone())
                   if window and window.last_at else traffic.last_at if traffic else None)
        last_check = max((t for t in (live_at, d.last_check_at) if t is not None), default=None)
        active = d.enabled and d.provider.enabled and d.model.enabled
        latency: int | None
        if window and window.latency_ms is not None:
            latency = window.latency_ms
        elif traffic and traffic.latency_ms is not None:
            latency = traffic.latency_ms
        else:
            latency = d.last_latency_ms
        probe_status = traffic.status() if traffic else d.health_status
        status = health.status(d.pk, probe_status) if active else "disabled"
        breaker_state = breaker.state_of(d.pk)
        if window:
            error_rate, calls, last_error = window.error_rate, len(window.calls), window.last_error or d.last_error
        elif traffic:
            error_rate, calls, last_error = traffic.error_rate, traffic.calls, traffic.last_error or d.last_error
        else:
            error_rate, calls, last_error = 0.0, 0, d.last_error
        rows.append(DeploymentHealth(
            deployment_id=d.pk, model=d.model.name, provider=d.provider.name, upstream_model=d.upstream_model,
            enabled=active, status=status, breaker_state=breaker_state,
            healthy=active and status != health.UNHEALTHY and breaker_state != breaker.OPEN,
            response_time_ms=latency, error_rate=round(error_rate, 4), recent_calls=calls,
            last_error=last_error, last_check=last_check, probe_status=d.health_status,
        ))
    return rows


def service_health() -> dict[str, Any]:
    """Overall status: unhealthy if an enabled model has no usable deployment, degraded if any is not healthy."""
    rows = deployment_health()
    by_model: dict[str, list[str]] = {}
    for row in rows:
        if row.enabled:
            by_model.setdefault(row.model, []).append(row.status)
    overall = "healthy"
    for statuses in by_model.values():
        if all(s == health.UNHEALTHY for s in statuses):
            overall = "unhealthy"
            break
        if any(s in (health.UNHEALTHY, health.DEGRADED) for s in statuses):
            overall = "degraded"
    return {"status": overall, "checked_at": timezone.now().isoformat(), "deployments": [r.as_json() for r in rows]}


def _money(value: Decimal | None) -> str:
    return money_str(value)


def service_metrics(start: datetime | None = None, end: datetime | None = None) -> dict[str, Any]:
    """Per deployment and per model metrics over [start, end] (default: the last hour), with cost from usage."""
    snap = metrics.snapshot(start, end)
    start_at, end_at = datetime.fromisoformat(snap["start"]), datetime.fromisoformat(snap["end"])
    records = UsageRecord.objects.filter(created_at__gte=start_at, created_at__lt=end_at)
    costs = {(r["provider"], r["model"], r["upstream_model"]): r["cost"]
             for r in records.values("provider", "model", "upstream_model").annotate(cost=Sum("cost"))}
    model_costs: dict[str, Decimal] = {}
    for (_, model, _), cost in costs.items():
        model_costs[model] = model_costs.get(model, Decimal("0")) + (cost or Decimal("0"))
    for row in snap["deployments"]:
        row["cost"] = _money(costs.get((row.get("provider"), row.get("model"), row.get("upstream_model"))))
    for row in snap["models"]:
        row["cost"] = _money(model_costs.get(row["model"]))
    summary = snap["summary"]
    snap["summary"] = {
        "total_requests": summary["requests"], "successes": summary["successes"], "errors": summary["errors"],
        "error_rate": summary["error_rate"], "average_latency_ms": summary["avg_latency_ms"],
        "p50_latency_ms": summary["p50_latency_ms"], "p95_latency_ms": summary["p95_latency_ms"],
        "p99_latency_ms": summary["p99_latency_ms"], "average_ttft_ms": summary["avg_ttft_ms"],
        "prompt_tokens": summary["prompt_tokens"], "completion_tokens": summary["completion_tokens"],
        "total_tokens": summary["total_tokens"], "cache_hits": summary["cache_hits"],
        "cache_misses": summary["cache_misses"], "cache_hit_rate": summary["cache_hit_rate"],
        "total_cost": _money(records.aggregate(total=Sum("cost"))["total"]),
    }
    snap["cache"] = cache.response_cache.stats()
    return snap
