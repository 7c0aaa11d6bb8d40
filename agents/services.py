"""Writes for providers, models (with their deployments) and agents; the staff API and setup scripts call these.

Prices are usage's: the entry points write them through usage.pricing.set_model_price, in the same transaction."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import transaction
from django.db.models import ProtectedError

from agents.llm import cache
from agents.models import Agent, Deployment, LLMModel, Provider
from aiwriter.errors import ApiError, Conflict


def _assign(obj: Any, fields: dict[str, Any]) -> None:
    for name, value in fields.items():
        setattr(obj, name, value)


def _clean(obj: Any) -> None:
    """Model validation as an API error (400 with the fields), never a 500."""
    try:
        obj.full_clean()
    except DjangoValidationError as exc:
        fields = dict(exc.message_dict)
        raise ApiError("Invalid data.", code="invalid", extra={"fields": fields}) from None


# --- providers --------------------------------------------------------------------------------

def create_provider(**fields: Any) -> Provider:
    provider = Provider(**fields)
    _clean(provider)
    provider.save()
    return provider


def update_provider(provider: Provider, **fields: Any) -> Provider:
    """An api_key left out keeps the stored one; an empty one clears it."""
    _assign(provider, fields)
    _clean(provider)
    provider.save()
    return provider


def delete_provider(provider: Provider) -> None:
    """Refused while models are deployed on it: silently leaving a model without deployments breaks callers."""
    models = sorted(set(provider.deployments.values_list("model__name", flat=True)))
    if models:
        raise Conflict(f"Provider '{provider.name}' serves {', '.join(models)}; remove those deployments first.",
                       code="provider_in_use")
    provider.delete()


# --- models -----------------------------------------------------------------------------------

def _set_deployments(model: LLMModel, deployments: list[dict[str, Any]]) -> None:
    """Makes the model's deployments exactly `deployments` ({provider, upstream_model, weight}), keeping ids."""
    existing = {(d.provider_id, d.upstream_model): d for d in model.deployments.all()}
    keep = set()
    for item in deployments:
        key = (item["provider"].pk, item["upstream_model"])
        keep.add(key)
        deployment = existing.get(key)
        if deployment is None:
            Deployment.objects.create(model=model, provider=item["provider"], upstream_model=item["upstream_model"],
                                      weight=item.get("weight", 1))
        elif deployment.weight != item.get("weight", deployment.weight):
            deployment.weight = item["weight"]
            deployment.save(update_fields=["weight"])
    for key, deployment in existing.items():
        if key not in keep:
            deployment.delete()


@transaction.atomic
def create_model(*, deployments: list[dict[str, Any]] | None = None, **fields: Any) -> LLMModel:
    model = LLMModel(**fields)
    _clean(model)
    model.save()
    _set_deployments(model, deployments or [])
    return model


@transaction.atomic
def update_model(model: LLMModel, *, deployments: list[dict[str, Any]] | None = None, **fields: Any) -> LLMModel:
    _assign(model, fields)
    _clean(model)
    model.save()
    if deployments is not None:
        _set_deployments(model, deployments)
    return model


def delete_model(model: LLMModel) -> None:
    try:
        model.delete()
    except ProtectedError:
        raise Conflict(f"Model '{model.name}' is used by agents; point them at another model first.",
                       code="model_in_use") from None


# --- agents -----------------------------------------------------------------------------------

def create_agent(**fields: Any) -> Agent:
    agent = Agent(**fields)
    _clean(agent)
    agent.save()
    return agent


def update_agent(agent: Agent, **fields: Any) -> Agent:
    _assign(agent, fields)
    _clean(agent)
    agent.save()
    return agent


def delete_agent(agent: Agent) -> None:
    agent.delete()


# --- cache ------------------------------------------------------------------------------------

def clear_response_cache(*, pattern: str | None = None, tier: str = cache.ALL) -> dict[str, int]:
    return cache.response_cache.clear(pattern, tier)
