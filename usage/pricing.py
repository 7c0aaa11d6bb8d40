"""Model prices and output limits for metering, cached in process briefly (the hot path reads them on every call).

Saving a ModelPrice or LLMModel clears this process's cache at once (signals wired in usage.apps); other
processes see a change within PRICE_CACHE_SECONDS. A price row effective from a later time never prices a
call that started earlier, so a change never alters past costs.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime

from usage.money import FREE, Price

logger = logging.getLogger(__name__)

PRICE_CACHE_SECONDS = 30.0


@dataclass(frozen=True)
class ModelPricing:
    name: str
    max_output_tokens: int
    history: tuple[tuple[datetime, Price], ...]  # newest first

    def price_at(self, moment: datetime) -> Price:
        """The row with the latest effective_from <= moment; a model with no price in force is free."""
        for effective_from, price in self.history:
            if effective_from <= moment:
                return price
        return FREE


_cache: dict[str, tuple[float, ModelPricing | None]] = {}
_lock = threading.Lock()


def _load(name: str) -> ModelPricing | None:
    from agents.models import LLMModel
    from usage.models import ModelPrice

    rows = list(
        ModelPrice.objects.filter(model__name=name).order_by("-effective_from", "-id")
        .values_list("id", "effective_from", "input_per_million", "cached_input_per_million", "output_per_million",
                     "model__max_output_tokens")
    )
    if rows:
        max_output = rows[0][5]
    else:
        max_output = LLMModel.objects.filter(name=name).values_list("max_output_tokens", flat=True).first()
        if max_output is None:
            return None
    history = tuple((r[1], Price(id=r[0], input=r[2], cached_input=r[3], output=r[4])) for r in rows)
    return ModelPricing(name=name, max_output_tokens=max_output, history=history)


def model_pricing(name: str) -> ModelPricing | None:
    """Pricing for a public model name, or None if there is no such model."""
    now = time.monotonic()
    hit = _cache.get(name)
    if hit is not None and hit[0] > now:
        return hit[1]
    pricing = _load(name)
    with _lock:
        _cache[name] = (now + PRICE_CACHE_SECONDS, pricing)
    return pricing


def is_cached(name: str) -> bool:
    """Whether model_pricing(name) answers without a query (async callers warm it in a thread otherwise)."""
    hit = _cache.get(name)
    return hit is not None and hit[0] > time.monotonic()


def price_at(name: str, moment: datetime) -> Price:
    pricing = model_pricing(name) if name else None
    return pricing.price_at(moment) if pricing else FREE


def clear_cache(*args, **kwargs) -> None:
    with _lock:
        _cache.clear()
