"""Exact money: Decimal with 10 places, never float. Prices are per million tokens."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Context, Decimal

MONEY_PLACES = Decimal("1e-10")
CENT = Decimal("0.01")
# Money columns are NUMERIC(24, 10) (usage.models.MONEY): 14 whole digits. A balance must stay below this.
MONEY_LIMIT = Decimal(10) ** 14
MILLION = Decimal(1_000_000)
ZERO = Decimal("0")
# Enough digits for a trillion tokens at the highest allowed price without losing a place.
_CONTEXT = Context(prec=60, rounding=ROUND_HALF_UP)


@dataclass(frozen=True)
class Price:
    """One price row, per million tokens; cached_input None = the input price."""

    input: Decimal
    output: Decimal
    cached_input: Decimal | None = None
    id: int | None = None

    @property
    def is_free(self) -> bool:
        return self.input == 0 and self.output == 0 and not self.cached_input


FREE = Price(input=ZERO, output=ZERO)


def quantize(amount: Decimal) -> Decimal:
    return amount.quantize(MONEY_PLACES, context=_CONTEXT)


def call_cost(price: Price, *, prompt_tokens: int, completion_tokens: int, cached_prompt_tokens: int = 0) -> Decimal:
    """Cost of one call; cached prompt tokens are priced at the cached-input price."""
    cached = max(0, min(cached_prompt_tokens, prompt_tokens))
    cached_price = price.cached_input if price.cached_input is not None else price.input
    raw = _CONTEXT.add(
        _CONTEXT.add(_CONTEXT.multiply(Decimal(prompt_tokens - cached), price.input),
                     _CONTEXT.multiply(Decimal(cached), cached_price)),
        _CONTEXT.multiply(Decimal(completion_tokens), price.output),
    )
    return quantize(_CONTEXT.divide(raw, MILLION))


def to_cents(amount: Decimal) -> int:
    """Whole cents (分), rounded half up, for reports."""
    return int(amount.quantize(CENT, context=_CONTEXT) * 100)


def money_str(amount: Decimal | None) -> str:
    """A decimal string in currency units, trailing zeros trimmed but never in exponent form."""
    value = quantize(amount or ZERO).normalize()
    return format(value, "f") if value != 0 else "0"
