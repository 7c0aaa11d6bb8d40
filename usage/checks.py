"""System checks for the usage settings: a typo here would silently change what people are billed."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from django.conf import settings
from django.core.checks import Error, register

CUTOFF_POLICIES = ("delivered", "drain")


@register()
def check_usage_settings(app_configs: Any = None, **kwargs: Any) -> list[Error]:
    errors = []
    if settings.CUTOFF_BILLING_POLICY not in CUTOFF_POLICIES:
        errors.append(Error(f"CUTOFF_BILLING_POLICY must be one of {CUTOFF_POLICIES}, "
                            f"not {settings.CUTOFF_BILLING_POLICY!r}.", id="usage.E001"))
    if not settings.CUTOFF_DRAIN_MAX_SECONDS > 0:
        errors.append(Error("CUTOFF_DRAIN_MAX_SECONDS must be positive (the cap on reading after a client left).",
                            id="usage.E002"))
    try:
        ZoneInfo(settings.QUOTA_TIME_ZONE)
    except (ZoneInfoNotFoundError, ValueError):
        errors.append(Error(f"QUOTA_TIME_ZONE {settings.QUOTA_TIME_ZONE!r} is not a known time zone.", id="usage.E003"))
    for name in ("DEFAULT_MONTHLY_TOKEN_LIMIT", "DEFAULT_MONTHLY_COST_LIMIT", "NEW_USER_CREDIT"):
        try:
            negative = Decimal(str(getattr(settings, name))) < 0
        except InvalidOperation:
            negative = True
        if negative:
            errors.append(Error(f"{name} must be a number >= 0.", id="usage.E004"))
    return errors
