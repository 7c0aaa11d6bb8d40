"""The usage settings are checked at start-up: a typo must not silently change what people are billed."""

from decimal import Decimal

from usage.checks import check_usage_settings


def _ids():
    return sorted(e.id for e in check_usage_settings())


def test_defaults_pass():
    assert _ids() == []


def test_unknown_cutoff_policy_and_bad_cap(settings):
    settings.CUTOFF_BILLING_POLICY = "drian"
    settings.CUTOFF_DRAIN_MAX_SECONDS = 0
    assert _ids() == ["usage.E001", "usage.E002"]


def test_bad_zone_and_negative_defaults(settings):
    settings.QUOTA_TIME_ZONE = "Mars/Olympus"
    settings.NEW_USER_CREDIT = Decimal("-1")
    assert _ids() == ["usage.E003", "usage.E004"]
