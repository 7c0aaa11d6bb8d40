"""Plain factory functions for test data (no fixture files)."""

from __future__ import annotations

import itertools
from decimal import Decimal

from django.contrib.auth import get_user_model
from django.utils import timezone

from agents.models import Agent, Deployment, LLMModel, Provider
from usage.billing.keys import create_api_key
from usage.models import ModelPrice

_seq = itertools.count(1)


def make_user(username: str | None = None, *, staff: bool = False, password: str = "pw-123456", **extra):
    username = username or f"user{next(_seq)}"
    user = get_user_model().objects.create_user(username=username, password=password, is_staff=staff, **extra)
    return user


def make_api_key(user=None, **kwargs) -> tuple[object, str]:
    user = user or make_user()
    return create_api_key(user=user, **kwargs)


def make_provider(name: str | None = None, *, kind: str = Provider.Kind.DEMO, base_url: str = "", api_key: str = "",
                  **extra) -> Provider:
    return Provider.objects.create(name=name or f"provider{next(_seq)}", kind=kind, base_url=base_url,
                                   api_key=api_key, **extra)


def make_model(name: str | None = None, *, provider: Provider | None = None, upstream_model: str | None = None,
               input_price: str = "0", output_price: str = "0", cached_input_price: str | None = None,
               **extra) -> LLMModel:
    model = LLMModel.objects.create(name=name or f"model{next(_seq)}", **extra)
    provider = provider or make_provider()
    Deployment.objects.create(model=model, provider=provider, upstream_model=upstream_model or model.name)
    ModelPrice.objects.create(
        model=model, input_per_million=Decimal(input_price), output_per_million=Decimal(output_price),
        cached_input_per_million=Decimal(cached_input_price) if cached_input_price is not None else None,
        effective_from=timezone.now() - timezone.timedelta(seconds=1),
    )
    return model


def make_agent(slug: str | None = None, *, model: LLMModel | None = None, **extra) -> Agent:
    slug = slug or f"agent{next(_seq)}"
    return Agent.objects.create(slug=slug, name=extra.pop("name", slug.title()), model=model or make_model(), **extra)


def make_fake_model(fake_upstream, name: str | None = None, *, input_price: str = "0", output_price: str = "0",
                    cached_input_price: str | None = None, upstream_model: str | None = None,
                    provider: Provider | None = None, api_key: str = "sk-fake-test-key", **model_fields) -> LLMModel:
    """A model served by the fake upstream: an `openai` Provider + LLMModel + Deployment + ModelPrice."""
    provider = provider or make_provider(kind=Provider.Kind.OPENAI, base_url=fake_upstream.base_url, api_key=api_key)
    return make_model(name, provider=provider, upstream_model=upstream_model, input_price=input_price,
                      output_price=output_price, cached_input_price=cached_input_price, **model_fields)


def add_fake_deployment(fake_upstream, model: LLMModel, upstream_model: str, *, weight: int = 1,
                        api_key: str = "sk-fake-test-key", **provider_fields) -> Deployment:
    """One more deployment of `model` on its own fake-upstream provider (for balancing and failover tests)."""
    provider = make_provider(kind=Provider.Kind.OPENAI, base_url=fake_upstream.base_url, api_key=api_key,
                             **provider_fields)
    return Deployment.objects.create(model=model, provider=provider, upstream_model=upstream_model, weight=weight)
