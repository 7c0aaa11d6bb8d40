"""Model prices: the one write path for price rows (staff API, admin, setup), and prices and output limits for
metering, cached in process briefly (the hot path reads them on every call).

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
from decimal import Decimal
from typing import Any

from django.core.exceptions import ValidationError as DjangoValidationError
from django.utils import timezone

from agents.models import LLMModel
from agents.selectors import current_price
from aiwriter.errors import ApiError
from aiwriter.money import FREE, Price
from usage.models import ModelPrice

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


# --- writes -------------------------------------------------------------------------------------
# The staff API's price fields; a model's create/update takes them and the entry point hands them here.
PRICE_FIELDS = ("input_price_per_million", "cached_input_price_per_million", "output_price_per_million")
# ModelPrice field -> the request field that set it, so a refused price names what the client sent.
PRICE_FIELD_NAMES = {"input_per_million": "input_price_per_million",
                     "cached_input_per_million": "cached_input_price_per_million",
                     "output_per_million": "output_price_per_million"}
NO_PRICE = {"input_per_million": Decimal("0"), "output_per_million": Decimal("0"), "cached_input_per_million": None}


def take_price_fields(fields: dict[str, Any], model: LLMModel | None) -> dict[str, Any] | None:
    """Pops the API's price fields from `fields`: the whole price they set (a field left out keeps the one in
    force for `model`, 0 for a new model), as set_model_price's arguments; None if none was given."""
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
    save_price(row, field_names=PRICE_FIELD_NAMES)
    return row


def save_price(row: ModelPrice, *, field_names: dict[str, str] | None = None) -> ModelPrice:
    """Validates and inserts a price row. Negative, absurd or over-precise prices are a 400 naming the fields
    (renamed by `field_names` to the request's), never a 500 and never a lock-out."""
    try:
        row.full_clean()
    except DjangoValidationError as exc:
        fields = {(field_names or {}).get(name, name): messages for name, messages in exc.message_dict.items()}
        raise ApiError("Invalid data.", code="invalid", extra={"fields": fields}) from None
    row.save()
    return row
