"""Model → deployments lookup, cached briefly in process so the hot path does not query the DB per call.

Saves and deletes of providers, models and deployments clear the cache in this process at once; other
processes see the change within LLM_ROUTE_CACHE_SECONDS.
"""

from __future__ import annotations

import functools
import threading
import time
from dataclasses import dataclass
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db.models.signals import post_delete, post_save

from agents.llm.types import ModelNotFound
from agents.models import Deployment, LLMModel, Provider
from aiwriter.singleflight import shared_load


@dataclass(frozen=True)
class DeploymentInfo:
    id: int
    model: str
    provider: str
    provider_id: int
    kind: str
    base_url: str
    api_key: str
    upstream_model: str
    weight: int
    rpm: int | None
    tpm: int | None
    max_concurrency: int | None
    timeout: float
    max_retries: int
    breaker_threshold: int
    breaker_recovery: float
    probe_status: str

    def __repr__(self) -> str:  # never show the api key in a traceback or log line
        return f"DeploymentInfo({self.id}, {self.model} → {self.provider}/{self.upstream_model})"


@dataclass(frozen=True)
class ModelRoute:
    id: int
    name: str
    strategy: str
    context_window: int
    max_output_tokens: int
    deployments: tuple[DeploymentInfo, ...]


_routes: dict[str, tuple[float, ModelRoute]] = {}
_lock = threading.Lock()


def deployment_info(d: Deployment) -> DeploymentInfo:
    p = d.provider
    return DeploymentInfo(
        id=d.pk, model=d.model.name, provider=p.name, provider_id=p.pk, kind=p.kind, base_url=p.base_url,
        api_key=p.api_key or "", upstream_model=d.upstream_model, weight=max(0, d.weight * p.weight),
        rpm=p.rpm, tpm=p.tpm, max_concurrency=p.max_concurrency, timeout=p.timeout, max_retries=p.max_retries,
        breaker_threshold=p.breaker_failure_threshold, breaker_recovery=p.breaker_recovery_seconds,
        probe_status=d.health_status,
    )


def load_route(name: str) -> ModelRoute:
    """Reads a model and its enabled deployments from the DB (sync)."""
    model = LLMModel.objects.filter(name=name, enabled=True).first()
    if model is None:
        raise ModelNotFound(f"Unknown model '{name}'.")
    deployments = (model.deployments.filter(enabled=True, provider__enabled=True)
                   .select_related("provider", "model").order_by("id"))
    return ModelRoute(id=model.pk, name=model.name, strategy=model.strategy, context_window=model.context_window,
                      max_output_tokens=model.max_output_tokens,
                      deployments=tuple(deployment_info(d) for d in deployments))


def get_route_sync(name: str) -> ModelRoute:
    now = time.monotonic()
    cached = _routes.get(name)
    if cached and cached[0] > now:
        return cached[1]
    route = load_route(name)
    with _lock:
        _routes[name] = (now + settings.LLM_ROUTE_CACHE_SECONDS, route)
    return route


async def get_route(name: str) -> ModelRoute:
    cached = _routes.get(name)
    if cached and cached[0] > time.monotonic():
        return cached[1]
    return await shared_load(("llm-route", name), functools.partial(sync_to_async(get_route_sync), name))


def clear() -> None:
    with _lock:
        _routes.clear()


def _on_change(sender: Any, **kwargs: Any) -> None:
    clear()


for _model in (Provider, LLMModel, Deployment):
    post_save.connect(_on_change, sender=_model, dispatch_uid=f"llm-route-cache-{_model.__name__}")
    post_delete.connect(_on_change, sender=_model, dispatch_uid=f"llm-route-cache-del-{_model.__name__}")
