"""Writes for providers, models (deployments, prices) and agents; the staff API and setup scripts call these."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import transaction
from django.db.models import ProtectedError
from django.utils import timezone

from agents.llm import cache
from agents.models import Agent, Deployment, LLMModel, Provider
from agents.selectors import current_price
from aiwriter.errors import ApiError, Conflict
from usage.models import ModelPrice

PRICE_FIELDS = ("input_price_per_million", "cached_input_price_per_million", "output_price_per_million")
# ModelPrice field -> the request field that set it, so a refused price names what the client sent.
PRICE_FIELD_NAMES = {"input_per_million": "input_price_per_million",
                     "cached_input_per_million": "cached_input_price_per_million",
                     "output_per_million": "output_price_per_million"}


def _assign(obj: Any, fields: dict[str, Any]) -> None:
    for name, value in fields.items():
        setattr(obj, name, value)


def _clean(obj: Any, rename: dict[str, str] | None = None) -> None:
    """Model validation as an API error (400 with the fields), never a 500. `rename` maps model field names to
    the request's (a price row's output_per_million is the API's output_price_per_million)."""
    try:
        obj.full_clean()
    except DjangoValidationError as exc:
        fields = {(rename or {}).get(name, name): messages for name, messages in exc.message_dict.items()}
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

def set_model_price(model: LLMModel, *, input_per_million: Decimal, output_per_million: Decimal,
                    cached_input_per_million: Decimal | None = None) -> ModelPrice | None:
    """Adds a price row effective now when the price changes; past usage keeps the cost it was charged."""
    now = timezone.now()
    price = current_price(model, at=now)
    if price is not None and (price.input_per_million, price.output_per_million, price.cached_input_per_million) == (
            input_per_million, output_per_million, cached_input_per_million):
        return None
    row = ModelPrice(model=model, input_per_million=input_per_million, output_per_million=output_per_million,
                     cached_input_per_million=cached_input_per_million, effective_from=now)
    _clean(row, PRICE_FIELD_NAMES)  # negative, absurd or over-precise prices are a 400, not a lock-out
    row.save()
    return row


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


def _prices(fields: dict[str, Any], model: LLMModel | None) -> dict[str, Any] | None:
    given = {name: fields.pop(name) for name in PRICE_FIELDS if name in fields}
    if not given:
        return None
    current = current_price(model) if model is not None and model.pk else None
    return {
        "input_per_million": given.get("input_price_per_million",
                                       current.input_per_million if current else Decimal("0")),
        "output_per_million": given.get("output_price_per_million",
                                        current.output_per_million if current else Decimal("0")),
        "cached_input_per_million": given.get("cached_input_price_per_million",
                                              current.cached_input_per_million if current else None),
    }


@transaction.atomic
def create_model(*, deployments: list[dict[str, Any]] | None = None, **fields: Any) -> LLMModel:
    prices = _prices(fields, None) or {"input_per_million": Decimal("0"), "output_per_million": Decimal("0"),
                                       "cached_input_per_million": None}
    model = LLMModel(**fields)
    _clean(model)
    model.save()
    _set_deployments(model, deployments or [])
    set_model_price(model, **prices)
    return model


@transaction.atomic
def update_model(model: LLMModel, *, deployments: list[dict[str, Any]] | None = None, **fields: Any) -> LLMModel:
    prices = _prices(fields, model)
    _assign(model, fields)
    _clean(model)
    model.save()
    if deployments is not None:
        _set_deployments(model, deployments)
    if prices is not None:
        set_model_price(model, **prices)
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
