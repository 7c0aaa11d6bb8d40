"""The user's usage page in a real browser: balance, quota bar, spend chart, API keys created once and revoked."""

from __future__ import annotations

from decimal import Decimal

import pytest

from tests.factories import make_user
from tests.fixtures_web import browser_login
from usage import periods
from usage.models import ApiKey, DailyRollup, Quota

pytestmark = [pytest.mark.browser, pytest.mark.pg, pytest.mark.timeout(60)]


@pytest.fixture
def alice(db):
    from usage.billing.ledger import grant_credits

    user = make_user("alice")
    grant_credits(user=user, amount=Decimal("42.5"), reason="test", created_by=None)
    return user


@pytest.fixture
def account_page(browser_page, web_server, alice):
    browser_login(browser_page, web_server, "alice", next_path="/account/")
    return browser_page


def test_balance_quota_and_spend_chart(browser_page, web_server, alice):
    today = periods.local_day()
    DailyRollup.objects.create(user=alice, day=today, model="m", provider="p", calls=3, total_tokens=300,
                               cost=Decimal("1.25"))
    Quota.objects.create(user=alice, monthly_token_limit=1000)
    from usage.models import UsageCounter

    UsageCounter.objects.create(user=alice, period=periods.month_start(), tokens=250, cost=Decimal("1.25"))
    page = browser_page
    browser_login(page, web_server, "alice", next_path="/account/")
    # The one money format: the server's decimal, trailing zeros stripped ("42.5", not "42.50" or "42.5000000000").
    page.wait_for_function("() => document.getElementById('balance').textContent === '42.5 CNY'")
    page.wait_for_selector("#quota-bars .quota")
    assert "250 of 1,000 (25%)" in page.inner_text("#quota-bars")
    assert page.locator("#quota-bars .bar[role=progressbar]").get_attribute("aria-valuenow") == "25"
    page.wait_for_selector("#spend-chart svg rect.chart-bar", state="attached")
    chart = page.locator("#spend-chart svg")
    assert "Spend per day" in chart.inner_html()
    heights = page.eval_on_selector_all("#spend-chart rect.chart-bar",
                                        "rs => rs.map(r => Number(r.getAttribute('height')))")
    assert sum(1 for h in heights if h > 0) == 1 and len(heights) >= 28
    assert "3 calls" in page.inner_text("#spend-chart")
    assert page.external_requests == [], "the page works with no internet"


def test_create_a_key_shown_once_then_revoke_it(account_page, alice):
    page = account_page
    page.wait_for_selector("#key-rows td")
    page.fill("#key-name", "my laptop")
    page.click("#create-key")
    page.wait_for_selector("#new-key:not([hidden])")
    raw = page.inner_text("#new-key-value").strip()
    assert raw.startswith("aiw_") and len(raw) > 20
    key = ApiKey.objects.get(user=alice, name="my laptop")
    assert key.key_hash == ApiKey.hash_key(raw)
    row = page.locator(f"#key-rows tr[data-key-id='{key.pk}']")
    row.wait_for()
    assert "active" in row.inner_text()

    page.reload()
    page.wait_for_selector(f"#key-rows tr[data-key-id='{key.pk}']")
    assert raw not in page.content(), "the key is shown once only"

    page.once("dialog", lambda dialog: dialog.accept())
    page.click(f"#key-rows tr[data-key-id='{key.pk}'] button.revoke")
    page.wait_for_selector(f"#key-rows tr[data-key-id='{key.pk}'].key-revoked")
    key.refresh_from_db()
    assert key.revoked_at is not None


@pytest.mark.parametrize("size", [pytest.param({"width": 1280, "height": 800}, id="desktop"),
                                  pytest.param({"width": 390, "height": 844}, id="phone")])
def test_own_calls_per_model_with_a_date_filter(browser_page, web_server, alice, size):
    from datetime import timedelta

    from django.utils import timezone

    from usage.models import UsageRecord

    today = periods.local_day()
    old_day = today - timedelta(days=40)
    for model, cost, day in (("gpt-a", "0.0005725", today), ("gpt-a", "0.25", today), ("gpt-b", "1.5", old_day)):
        when = timezone.now() - timedelta(days=(today - day).days)
        UsageRecord.objects.create(user=alice, model=model, provider="p", prompt_tokens=10, completion_tokens=5,
                                   total_tokens=15, cost=Decimal(cost), charged=True, entry_point="chat",
                                   latency_ms=120, created_at=when)
    # The stats come from the daily rollups (kept by the metering in production).
    DailyRollup.objects.create(user=alice, day=today, model="gpt-a", provider="p", calls=2, total_tokens=30,
                               cost=Decimal("0.2505725"))
    DailyRollup.objects.create(user=alice, day=old_day, model="gpt-b", provider="p", calls=1, total_tokens=15,
                               cost=Decimal("1.5"))
    bob = make_user("bob")
    UsageRecord.objects.create(user=bob, model="bobs-model", provider="p", total_tokens=1, cost=Decimal("9"),
                               charged=True, entry_point="chat")
    page = browser_page
    page.set_viewport_size(size)
    browser_login(page, web_server, "alice", next_path="/account/")
    page.wait_for_selector("#call-rows tr[data-record-id]")
    # Default range: this month so far.
    assert page.locator("#call-rows tr[data-record-id]").count() == 2
    assert page.locator("#model-rows tr").count() == 1
    assert page.locator("#model-rows tr td").all_inner_texts()[:4] == ["gpt-a", "2", "30", "0.2505725 CNY"]
    assert "0.0005725 CNY" in page.inner_text("#call-rows")
    assert "bobs-model" not in page.inner_text("#calls-panel")
    page.fill("#calls-start", old_day.isoformat())
    page.click("#calls-apply")
    page.wait_for_function("() => document.querySelectorAll('#call-rows tr[data-record-id]').length === 3")
    models = page.locator("#model-rows tr td:first-child").all_inner_texts()
    assert models == ["gpt-a", "gpt-b"]
    wide = page.evaluate("() => document.scrollingElement.scrollWidth")
    assert wide <= size["width"], f"the page is {wide} px wide"
