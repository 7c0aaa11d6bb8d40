"""The admin dashboard: server-drawn SVG charts with axes and labels, top spenders, cache hit rate, deployments."""

from __future__ import annotations

import re
from datetime import timedelta
from decimal import Decimal

import pytest
from django.urls import reverse
from django.utils import timezone

from aiwriter import charts
from tests.factories import make_agent, make_api_key, make_user
from usage.models import UsageRecord

pytestmark = pytest.mark.django_db


def _record(user, model="m1", **extra) -> UsageRecord:
    fields = {"provider": "p1", "model": model, "total_tokens": 100, "cost": Decimal("0.5"), "entry_point": "chat",
              **extra}
    return UsageRecord.objects.create(user=user, **fields)


def test_dashboard_renders_its_charts(operator_client):
    alice, bob = make_user("alice"), make_user("bob")
    make_agent("writer")  # a deployment for the health table
    _record(alice, cost=Decimal("2"))
    _record(alice, status="error", cost=Decimal("0"))
    _record(bob, model="m2", cached=True, cost=Decimal("0.25"))
    _record(bob, debug=True, cost=Decimal("99"))  # staff debug runs are left out
    response = operator_client.get(reverse("admin-dashboard"))
    assert response.status_code == 200
    body = response.content.decode()
    assert body.count('<svg class="chart') == 6
    for title in ("Requests", "Tokens", "Cost (CNY)", "Error rate and cache hit rate", "Top users by cost (CNY)",
                  "Top models by cost (CNY)"):
        assert f">{title}</text>" in body
    assert 'id="total-requests">3<' in body
    assert 'id="cache-hit-rate">33%<' in body
    assert ">alice<" in body and ">bob<" in body  # top users, labelled
    assert ">2.25 CNY<" in body  # the 99 of the debug run is not in the cost
    assert 'id="deployment-health"' in body and "closed" in body


@pytest.mark.parametrize("range_key", ["1", "7", "30", "90", "bogus"])
def test_every_range_renders(operator_client, range_key):
    _record(make_user(), created_at=timezone.now())
    assert operator_client.get(reverse("admin-dashboard"), {"range": range_key}).status_code == 200


def test_old_records_fall_outside_the_range(operator_client):
    record = _record(make_user())
    UsageRecord.objects.filter(pk=record.pk).update(created_at=timezone.now() - timedelta(days=40))
    body = operator_client.get(reverse("admin-dashboard"), {"range": "30"}).content.decode()
    assert 'id="total-requests">0<' in body


def test_labels_in_charts_are_escaped():
    svg = charts.bar_chart([("<script>alert(1)</script>", Decimal("1"))], title="T <b>")
    assert "<script>" not in svg and "&lt;script&gt;" in svg and "T &lt;b&gt;" in svg


def test_line_chart_has_axes_ticks_and_labels():
    svg = charts.line_chart(["01-01", "01-02", "01-03"], {"calls": [0, 5, 12]}, title="Requests", y_label="calls")
    assert svg.count("<line") >= 4  # two axes and grid lines
    assert ">15</text>" in svg or ">12</text>" in svg or ">20</text>" in svg  # a round top tick
    assert ">01-01</text>" in svg and ">01-03</text>" in svg
    assert "<polyline" in svg


def test_nice_ticks_are_round():
    assert charts.nice_ticks(12) == [0, 5, 10, 15]
    assert charts.nice_ticks(0) == [0.0, 1.0]
    assert charts.nice_ticks(0.003)[-1] >= 0.003


def test_each_deployment_shows_its_health_and_breaker_state(operator_client):
    from agents.llm import breaker
    from agents.models import Deployment

    make_agent("writer")
    make_agent("editor")
    tripped, fine = Deployment.objects.order_by("id")[:2]
    Deployment.objects.filter(pk=tripped.pk).update(last_error="upstream said 500 <b>")
    breaker.get(tripped.pk, threshold=1).failure()  # one failure opens it: the router skips it for a while
    body = operator_client.get(reverse("admin-dashboard")).content.decode()
    rows = body.split('<tr class="deployment">')[1:]
    assert len(rows) == 2
    by_model = {m: next(r for r in rows if f"<td>{m}</td>" in r) for m in (tripped.model.name, fine.model.name)}
    assert '<span class="state state-open">open</span>' in by_model[tripped.model.name]
    assert "upstream said 500 &lt;b&gt;" in by_model[tripped.model.name]
    assert '<span class="state state-closed">closed</span>' in by_model[fine.model.name]


def test_cost_axis_ticks_are_distinct_rounded_values():
    # 0.0125 and 0.015 both printed "0.01" before: each tick now says its own value.
    chart = charts.line_chart(["a", "b"], {"cost": [Decimal("0.012"), Decimal("0.004")]}, title="Cost")
    ticks = re.findall(r'<text class="tick"[^>]*>([^<]*)</text>', chart)
    assert ticks == ["0.000", "0.005", "0.010", "0.015"]
    tiny = charts.line_chart(["a"], {"cost": [Decimal("0.00003")]}, title="Cost")
    assert "e-05" not in tiny and ">0.00003</text>" in tiny


def test_charts_show_values_on_hover_without_script():
    chart = charts.line_chart(["05-01", "05-02"], {"requests": [3, 4], "errors": [0, 1]}, title="Requests")
    assert '<rect class="hover"' in chart
    assert "<title>05-02: requests 4; errors 1</title>" in chart
    assert "<script" not in chart and "onmouse" not in chart


def test_dashboard_shows_latency_percentiles_and_breakdowns(operator_client):
    alice = make_user("alice")
    key, _ = make_api_key(alice, name="laptop")
    for ms in range(1, 101):  # 1..100 ms
        _record(alice, model="m1" if ms % 2 else "m2", latency_ms=ms, api_key=key if ms <= 10 else None,
                cost=Decimal("0.0005725"))
    _record(alice, cached=True, latency_ms=100000)  # a cache hit never went upstream
    body = operator_client.get(reverse("admin-dashboard")).content.decode()
    assert '<span id="latency-p50">50</span>' in body
    assert '<span id="latency-p95">95</span>' in body and '<span id="latency-p99">99</span>' in body
    by_model = body.split('id="by-model"')[1].split("</table>")[0]
    assert "<td>m1</td>" in by_model and "<td>m2</td>" in by_model
    assert '<td class="num">0.028625</td>' in by_model  # 50 × 0.0005725, the one money format
    by_key = body.split('id="by-key"')[1].split("</table>")[0]
    assert f"laptop ({key.prefix}…)" in by_key and "(no key: chat page)" in by_key
    assert '<td class="num">10</td>' in by_key
    assert 'id="total-cost">' in body and "0000000" not in body.split('id="total-cost">')[1][:40]
