"""Raw SQL helpers shared by the billing modules: quoting, numeric parameters both backends compare as numbers."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from aiwriter.db import quote_name, vendor
from aiwriter.money import quantize

# --- Raw SQL helpers: upserts that increment, conditional updates that return ----------------------------------------

def _q(name: str) -> str:
    return quote_name(name)


def _num(value: Decimal) -> Decimal | str:
    # SQLite compares a bare text parameter as text; CAST(... AS NUMERIC) makes it a number on both backends.
    return str(value) if vendor() == "sqlite" else value


def _dec(value: Any) -> Decimal:
    return quantize(Decimal(str(value)))
