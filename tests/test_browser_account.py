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
    from usage.services import grant_credits

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
    page.wait_for_function("() => document.getElementById('balance').textContent.includes('42.50')")
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
