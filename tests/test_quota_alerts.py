"""Monthly quotas: O(1) counters, warning once at 90 %, critical once at 100 %, then refused; month resets."""

import hashlib
import hmac
import json
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
from django.core import mail

from tests.factories import make_api_key, make_model, make_user
from tests.fixtures_usage import simulate_call
from usage import periods
from usage.billing.ledger import grant_credits
from usage.errors import KeyBudgetExceeded, QuotaExceeded
from usage.models import ApiKey, Quota, QuotaAlert, UsageCounter
from usage.selectors import quota_status

pytestmark = pytest.mark.django_db

SHANGHAI = ZoneInfo("Asia/Shanghai")


# Alerts are delivered when the charge commits: tests that watch delivery run with real transactions.
@pytest.mark.django_db(transaction=True)
def test_warning_once_at_90_critical_once_at_100_then_refused():
    user = make_user(email="alice@example.com")
    Quota.objects.create(user=user, monthly_token_limit=1000)
    simulate_call(user, prompt=800, completion=50)
    assert not QuotaAlert.objects.exists()
    simulate_call(user, prompt=40, completion=10)  # 900: warning
    simulate_call(user, prompt=40, completion=10)  # 950: still warning, not again
    assert list(QuotaAlert.objects.values_list("level", flat=True)) == ["warning"]
    simulate_call(user, prompt=50)  # 1000: critical
    assert sorted(QuotaAlert.objects.values_list("level", flat=True)) == ["critical", "warning"]
    assert [m.subject for m in mail.outbox] == ["[aiwriter] Quota warning", "[aiwriter] Quota critical"]
    assert QuotaAlert.objects.filter(delivered=True).count() == 2
    with pytest.raises(QuotaExceeded):
        simulate_call(user, prompt=1)
    status = quota_status(user=user)
    assert status["exceeded"] and status["usage"]["tokens"] == 1000 and status["percentage"]["tokens"] == 100.0
    assert status["alert"]["level"] == "critical"


@pytest.mark.django_db(transaction=True)
def test_alert_webhook_is_signed_with_hmac(settings, billing_receiver):
    settings.ALERT_WEBHOOK_URL = billing_receiver.url
    settings.ALERT_WEBHOOK_SECRET = "s3cret"
    user = make_user("dora")
    Quota.objects.create(user=user, monthly_token_limit=10)
    simulate_call(user, prompt=9)
    (headers, body), = billing_receiver.raw
    expected = "sha256=" + hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    assert headers["X-Aiwriter-Signature"] == expected
    payload = json.loads(body)
    assert payload["level"] == "warning" and payload["user"] == "dora" and "90%" in payload["message"]


def test_cost_limit_counts_charged_money():
    user = make_user()
    grant_credits(user=user, amount=Decimal("10"), reason="t", created_by=None)
    model = make_model(input_price="0", output_price="1000")  # 0.001 per token
    Quota.objects.create(user=user, monthly_cost_limit=Decimal("0.01"))
    simulate_call(user, model=model.name, completion=9)
    assert QuotaAlert.objects.get().level == "warning"
    simulate_call(user, model=model.name, completion=1)
    with pytest.raises(QuotaExceeded):
        simulate_call(user, model=model.name, completion=1)
    assert quota_status(user=user)["usage"]["cost"] == "0.01"


def test_default_limit_from_settings(settings):
    settings.DEFAULT_MONTHLY_TOKEN_LIMIT = 10
    user = make_user()
    simulate_call(user, prompt=10)
    with pytest.raises(QuotaExceeded):
        simulate_call(user, prompt=1)


def test_project_quota_is_separate_from_the_account():
    user = make_user()
    Quota.objects.create(user=user, project="blog", monthly_token_limit=100)
    simulate_call(user, project="blog", prompt=100)
    with pytest.raises(QuotaExceeded):
        simulate_call(user, project="blog", prompt=1)
    simulate_call(user, project="other", prompt=1000)  # the account itself is unlimited
    assert UsageCounter.objects.get(user=user, project="").tokens == 1100


def test_failed_and_debug_calls_do_not_count():
    user = make_user()
    Quota.objects.create(user=user, monthly_token_limit=100)
    simulate_call(user, prompt=500, status="error", billable=False)
    simulate_call(user, prompt=500, debug=True)
    simulate_call(user, prompt=99)
    assert quota_status(user=user)["usage"]["tokens"] == 99


def test_api_key_monthly_budget():
    user = make_user()
    grant_credits(user=user, amount=Decimal("10"), reason="t", created_by=None)
    model = make_model(input_price="0", output_price="1000")
    key, _ = make_api_key(user)
    ApiKey.objects.filter(pk=key.pk).update(monthly_budget=Decimal("0.002"))
    key.refresh_from_db()
    simulate_call(user, model=model.name, completion=2, api_key=key)
    with pytest.raises(KeyBudgetExceeded):
        simulate_call(user, model=model.name, completion=1, api_key=key)
    simulate_call(user, model=model.name, completion=1)  # other entry points are not bound by the key's budget


# --- The month: local calendar month in QUOTA_TIME_ZONE ------------------------------------------------------------

_MS = timedelta(milliseconds=1)


@pytest.mark.parametrize(("last_ms", "old", "new"), [
    (datetime(2027, 1, 31, 23, 59, 59, 999000, tzinfo=SHANGHAI), date(2027, 1, 1), date(2027, 2, 1)),
    (datetime(2028, 2, 29, 23, 59, 59, 999000, tzinfo=SHANGHAI), date(2028, 2, 1), date(2028, 3, 1)),
    (datetime(2026, 12, 31, 23, 59, 59, 999000, tzinfo=SHANGHAI), date(2026, 12, 1), date(2027, 1, 1)),
])
def test_month_turns_at_local_midnight(last_ms, old, new):
    assert periods.month_start(last_ms) == old and periods.month_start(last_ms + _MS) == new
    # The same instant in UTC is 8 hours earlier on the clock, and still in the old month.
    assert periods.month_start(last_ms.astimezone(UTC)) == old


@pytest.mark.parametrize(("utc_last_ms", "old", "new"), [
    # New York in summer time (UTC-4): April starts at 04:00 UTC, not 05:00.
    (datetime(2027, 4, 1, 3, 59, 59, 999000, tzinfo=UTC), date(2027, 3, 1), date(2027, 4, 1)),
    # Back on standard time (UTC-5) after November's change: December starts at 05:00 UTC.
    (datetime(2027, 12, 1, 4, 59, 59, 999000, tzinfo=UTC), date(2027, 11, 1), date(2027, 12, 1)),
])
def test_month_turns_at_local_midnight_across_dst(settings, utc_last_ms, old, new):
    settings.QUOTA_TIME_ZONE = "America/New_York"
    assert periods.month_start(utc_last_ms) == old and periods.month_start(utc_last_ms + _MS) == new
    start, end = periods.month_bounds(old)
    assert end == utc_last_ms + _MS  # the month's end is exactly local midnight on the 1st


def test_quota_resets_at_local_midnight_on_the_first():
    user = make_user()
    Quota.objects.create(user=user, monthly_token_limit=100)
    last_ms = datetime(2028, 2, 29, 23, 59, 59, 999000, tzinfo=SHANGHAI)
    simulate_call(user, prompt=100, now=datetime(2028, 2, 10, tzinfo=SHANGHAI))
    with pytest.raises(QuotaExceeded):
        simulate_call(user, prompt=1, now=last_ms)
    simulate_call(user, prompt=100, now=last_ms + _MS)  # March: a fresh quota
    with pytest.raises(QuotaExceeded):
        simulate_call(user, prompt=1, now=last_ms + _MS)
    # Each month has its own alerts: critical fired once in February and once again in March.
    assert sorted(QuotaAlert.objects.filter(level="critical").values_list("period", flat=True)) == [
        date(2028, 2, 1), date(2028, 3, 1)]


def test_quota_resets_across_dst_in_the_configured_zone(settings):
    settings.QUOTA_TIME_ZONE = "America/New_York"
    user = make_user()
    Quota.objects.create(user=user, monthly_token_limit=100)
    last_ms = datetime(2027, 4, 1, 3, 59, 59, 999000, tzinfo=UTC)  # 23:59:59.999 EDT on 31 March
    simulate_call(user, prompt=100, now=datetime(2027, 3, 5, 12, tzinfo=UTC))  # before the DST change
    with pytest.raises(QuotaExceeded):
        simulate_call(user, prompt=1, now=last_ms)
    simulate_call(user, prompt=1, now=last_ms + _MS)
    assert set(UsageCounter.objects.values_list("period", flat=True)) == {date(2027, 3, 1), date(2027, 4, 1)}


@pytest.mark.pg
@pytest.mark.django_db(transaction=True)
def test_concurrent_calls_fire_each_alert_once():
    from concurrent.futures import ThreadPoolExecutor

    from django.db import connection

    user = make_user(email="eve@example.com")
    Quota.objects.create(user=user, monthly_token_limit=100)

    def call(_):
        try:
            simulate_call(user, prompt=10)
            return True
        except QuotaExceeded:
            return False
        finally:
            connection.close()

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(call, range(20)))
    assert sorted(QuotaAlert.objects.values_list("level", flat=True)) == ["critical", "warning"]
    assert len(mail.outbox) == 2
    # Calls checked before the counter reached the limit may still finish: never more than the in-flight ones.
    assert 10 <= results.count(True) <= 10 + 8


# --- The same, with the real clock frozen (no `now=` passed anywhere: timezone.now() itself is pinned) ------------

@pytest.mark.parametrize(("zone", "last_ms_local"), [
    ("Asia/Shanghai", datetime(2027, 1, 31, 23, 59, 59, 999000)),  # the last millisecond of January
    ("Asia/Shanghai", datetime(2028, 2, 29, 23, 59, 59, 999000)),  # ... of February in a leap year
    ("Europe/Berlin", datetime(2027, 3, 31, 23, 59, 59, 999000)),  # March began on CET (UTC+1), ends on CEST (+2)
    ("Europe/Berlin", datetime(2027, 10, 31, 23, 59, 59, 999000)),  # October began on CEST, ends on CET
    ("America/New_York", datetime(2027, 11, 30, 23, 59, 59, 999000)),  # November began on EDT, ends on EST
])
def test_frozen_clock_quota_resets_at_local_midnight_on_the_first(settings, api_client, zone, last_ms_local):
    import time_machine

    settings.QUOTA_TIME_ZONE = zone
    tz = ZoneInfo(zone)
    last_ms = last_ms_local.replace(tzinfo=tz)
    first_ms = last_ms_local.replace(day=1, hour=0, minute=0, second=0, microsecond=0, tzinfo=tz)
    old, new = first_ms.date(), periods.next_month(first_ms.date())
    user = make_user()
    Quota.objects.create(user=user, monthly_token_limit=100)
    api_client.force_authenticate(user)
    with time_machine.travel(first_ms, tick=False):  # local midnight on the 1st: already this month
        simulate_call(user, prompt=100)
    with time_machine.travel(last_ms, tick=False):
        body = api_client.get("/api/usage/quota/").json()
        assert body["period"]["start"] == old.isoformat() and body["exceeded"] is True
        assert body["usage"]["tokens"] == 100 and body["alert"]["level"] == "critical"
        with pytest.raises(QuotaExceeded):
            simulate_call(user, prompt=1)
    with time_machine.travel(last_ms + _MS, tick=False):
        body = api_client.get("/api/usage/quota/").json()
        assert body["period"]["start"] == new.isoformat() and body["exceeded"] is False
        assert body["usage"] == {"tokens": 0, "cost": "0"} and body["alert"] is None
        record = simulate_call(user, prompt=100)
        assert record.created_at == last_ms + _MS
        with pytest.raises(QuotaExceeded):
            simulate_call(user, prompt=1)
    assert dict(UsageCounter.objects.values_list("period", "tokens")) == {old: 100, new: 100}
    assert sorted(QuotaAlert.objects.filter(level="critical").values_list("period", flat=True)) == [old, new]
