"""Reads: which model or agent a request names, and which of them an API key may use.

A key with no allowed models may use every enabled model; otherwise only those listed, and the
agents whose model is listed. Such an agent falls back only to a model the key may use too: a fallback
outside the key's models is left out for that key. One query per lookup: the key's restriction is
checked in subqueries.
"""

from __future__ import annotations

from typing import Any

from django.db.models import Exists, OuterRef, QuerySet

from agents.llm.types import ModelNotFound
from agents.models import Agent, LLMModel
from usage.models import ApiKey
from usage.pipeline import Target

AGENT_PREFIX = "agent:"


def _with_key_access(queryset: QuerySet, api_key: ApiKey | None, model_ref: str,
                     fallback_ref: str | None = None) -> QuerySet:
    if api_key is None:
        return queryset
    links = ApiKey.allowed_models.through.objects.filter(apikey_id=api_key.pk)
    checks = {"key_restricted": Exists(links), "key_allows": Exists(links.filter(llmmodel_id=OuterRef(model_ref)))}
    if fallback_ref is not None:
        checks["key_allows_fallback"] = Exists(links.filter(llmmodel_id=OuterRef(fallback_ref)))
    return queryset.annotate(**checks)


def _allowed(row: Any, api_key: ApiKey | None, check: str = "key_allows") -> bool:
    return api_key is None or not row.key_restricted or getattr(row, check)


def resolve_target(name: str, api_key: ApiKey | None = None) -> Target:
    """The enabled model or `agent:<slug>` that `name` means for this key; ModelNotFound otherwise."""
    if name.startswith(AGENT_PREFIX):
        agents = Agent.objects.select_related("model", "fallback_model").filter(
            slug=name[len(AGENT_PREFIX):], enabled=True, model__enabled=True)
        agent = _with_key_access(agents, api_key, "model_id", "fallback_model_id").first()
        if agent is None or not _allowed(agent, api_key):
            raise ModelNotFound(f"Unknown model '{name}'.")
        fallback = agent.fallback_model if _allowed(agent, api_key, "key_allows_fallback") else None
        return Target(name=name, model=agent.model, agent=agent, fallback=fallback)
    models = LLMModel.objects.filter(name=name, enabled=True)
    model = _with_key_access(models, api_key, "pk").first()
    if model is None or not _allowed(model, api_key):
        raise ModelNotFound(f"Unknown model '{name}'.")
    return Target(name=name, model=model)


def usable_names(api_key: ApiKey | None) -> list[tuple[str, Any]]:
    """(name, created_at) of the models and `agent:` names the key may use, models first."""
    models = LLMModel.objects.filter(enabled=True)
    if api_key is not None and api_key.allowed_models.exists():
        models = models.filter(api_keys=api_key)
    agents = Agent.objects.filter(enabled=True, model__in=models).order_by("slug")
    return ([(m.name, m.created_at) for m in models.order_by("name")]
            + [(AGENT_PREFIX + a.slug, a.created_at) for a in agents])
