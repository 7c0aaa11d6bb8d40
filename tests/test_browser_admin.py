"""The operators' admin in a real browser: change a price, run an agent's execution test, read the dashboard."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.conf import settings
from django.utils import timezone

from aiwriter.money import money_str
from tests.factories import make_agent, make_fake_model
from tests.fixtures_web import admin_login
from usage.models import AdminDebugLog, UsageRecord

pytestmark = [pytest.mark.browser, pytest.mark.pg, pytest.mark.timeout(60)]


@pytest.fixture
def agent(fake_upstream):
    model = make_fake_model(fake_upstream, "admin-model", input_price="1000", output_price="2000")
    fake_upstream.configure("admin-model", reply="Debug reply from the upstream.")
    return make_agent("writer", name="Writer", model=model)


@pytest.fixture
def admin_page(browser_page, web_server, operator, agent):
    admin_login(browser_page, web_server, "operator")
    return browser_page


def test_operator_changes_a_model_price(admin_page, web_server, agent):
    page = admin_page
    page.click("#content-main a[href='/admin/agents/llmmodel/']:text-is('Models')")
    page.click("#result_list a:text-is('admin-model')")
    page.wait_for_selector("#prices-group")
    page.fill("input[name='prices-1-input_per_million']", "1500")
    page.fill("input[name='prices-1-output_per_million']", "2500")
    page.click("input[name='_save']")
    page.wait_for_selector("ul.messagelist li.success")
    prices = list(agent.model.prices.order_by("effective_from"))
    assert [(p.input_per_million, p.output_per_million) for p in prices] == [
        (Decimal("1000"), Decimal("2000")), (Decimal("1500"), Decimal("2500"))]
    assert prices[1].effective_from <= timezone.now()
    page.click("#result_list a:text-is('admin-model')")
    page.wait_for_selector("#prices-group")
    # Both rows are history now, shown read-only, with a fresh blank row for the next change.
    assert page.locator("input[name='prices-0-input_per_million']").count() == 0
    assert page.locator("input[name='prices-2-input_per_million']").count() == 1


def test_operator_runs_an_execution_test_and_finds_it_in_debug_logs(admin_page, web_server, agent):
    page = admin_page
    page.goto(f"{web_server}/admin/agents/agent/")
    page.click("td.field-debug_link a")
    page.check("input[name=action][value=run]")
    page.fill("textarea[name=message]", "Say hello to the operator")
    page.click("input[name=_run]")
    page.wait_for_selector("#debug-result")
    assert "Debug reply from the upstream." in page.inner_text("#debug-reply")
    log = AdminDebugLog.objects.get(action="run")
    assert log.cost > 0
    assert page.inner_text("td.debug-cost") == money_str(log.cost)
    assert UsageRecord.objects.get().debug is True

    page.click("text=Open this entry in the debug log")
    page.wait_for_url(f"**/admin/usage/admindebuglog/{log.pk}/change/")
    page.goto(f"{web_server}/admin/usage/admindebuglog/")
    row = page.locator("#result_list tbody tr").first
    assert "Execution test" in row.inner_text() and "admin-model" in row.inner_text()


def test_dashboard_renders_its_charts(admin_page, web_server, operator, agent):
    UsageRecord.objects.create(user=operator, provider="p", model="admin-model", total_tokens=120,
                               cost=Decimal("0.3"), entry_point="chat")
    page = admin_page
    page.click("#aiw-dashboard-link a")
    page.wait_for_selector("svg.chart")
    assert page.locator("svg.chart").count() == 6
    for svg in page.locator("svg.chart").all():
        box = svg.bounding_box()
        assert box and box["width"] >= 500 and box["height"] >= 100, "each chart is drawn at a readable size"
    assert page.locator("svg.line-chart polyline.series").count() >= 5
    assert page.locator("svg.bar-chart rect.bar").count() >= 2
    # Readable: each line chart has its two axes, tick labels, x labels, a y-axis label and a legend.
    for svg in page.locator("svg.line-chart").all():
        assert svg.locator("g.axis line").count() == 2
        assert svg.locator("text").count() >= 6
    titles = page.eval_on_selector_all("svg.chart > title", "ts => ts.map(t => t.textContent)")
    assert titles[:4] == ["Requests", "Tokens", f"Cost ({settings.CURRENCY})", "Error rate and cache hit rate"]
    requests_chart = page.locator("svg.line-chart").first
    assert {"calls", "requests", "errors"} <= set(requests_chart.locator("text").all_text_contents())
    top_models = page.locator("svg.bar-chart").last
    bar_texts = top_models.locator("text").all_text_contents()  # a bar's label, its value written at its end
    assert any(t.startswith("admin-model") for t in bar_texts) and "0.3" in bar_texts
    assert page.external_requests == []
    assert page.inner_text("#total-requests") == "1"
    health = page.locator("#deployment-health tr.deployment").first.inner_text()
    assert "admin-model" in health and "closed" in health  # the breaker's state, per deployment
    page.click("text=Last 24 hours")
    page.wait_for_url("**/admin/dashboard/?range=1")
    assert page.locator("svg.chart").count() == 6


def _page_width(page) -> int:
    return page.evaluate("document.documentElement.scrollWidth")


def test_wide_admin_tables_fit_1280px(admin_page, web_server, operator, agent):
    long = "x" * 180
    for i in range(3):
        UsageRecord.objects.create(user=operator, provider=f"provider-with-a-long-name-{i}", model="admin-model",
                                   upstream_model=long, project="a-rather-long-project-name", total_tokens=120,
                                   cost=Decimal("0.0005725"), entry_point="chat", latency_ms=321)
    deployment = agent.model.deployments.get()
    deployment.last_error = "upstream_error: " + long
    deployment.save()
    page = admin_page
    for url in ("/admin/usage/usagerecord/", "/admin/agents/agent/", "/admin/agents/provider/",
                f"/admin/agents/llmmodel/{agent.model.pk}/change/",
                f"/admin/agents/provider/{deployment.provider_id}/change/"):
        page.goto(f"{web_server}{url}")
        page.wait_for_selector("#content")
        assert _page_width(page) <= 1280, url
    assert page.console_messages == []


def test_dashboard_charts_show_values_on_hover(admin_page, web_server, operator, agent):
    UsageRecord.objects.create(user=operator, provider="p", model="admin-model", total_tokens=120,
                               cost=Decimal("0.3"), entry_point="chat", latency_ms=250)
    page = admin_page
    page.goto(f"{web_server}/admin/dashboard/")
    chart = page.locator("svg.line-chart").first
    column = chart.locator("rect.hover").last
    column.hover()
    box = column.bounding_box()
    # The element under the pointer carries the tooltip (a native SVG <title>: no script, CSP-safe).
    tip = page.evaluate("([x, y]) => document.elementFromPoint(x, y).querySelector('title')?.textContent",
                        [box["x"] + box["width"] / 2, box["y"] + box["height"] / 2])
    assert tip and "requests 1" in tip and "errors 0" in tip
    assert page.inner_text("#latency-p50") == "250"
    assert _page_width(page) <= 1280
    assert page.console_messages == []
