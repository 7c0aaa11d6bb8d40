"""Usage records, API keys, debug logs and billing sync in the admin: filters, CSV export, spend, secrets."""

from __future__ import annotations

import csv
import io
from datetime import timedelta
from decimal import Decimal

import pytest
from django.urls import reverse
from django.utils import timezone

from agents.llm.types import ChatRequest
from tests.factories import make_api_key, make_model, make_user
from usage import periods
from usage.billing import calls, holds, ledger, recording
from usage.metering import CallContext
from usage.models import ApiKey, ApiKeyCounter, UsageRecord

pytestmark = pytest.mark.django_db

RECORDS = "/admin/usage/usagerecord/"


def _record(user, **extra) -> UsageRecord:
    fields = {"provider": "p1", "model": "m1", "total_tokens": 10, "cost": Decimal("0.1"), "entry_point": "chat",
              **extra}
    return UsageRecord.objects.create(user=user, **fields)


@pytest.fixture
def records():
    alice, bob = make_user("alice"), make_user("bob")
    return {
        "a1": _record(alice, project="alpha", model="m1", provider="p1"),
        "a2": _record(alice, project="beta", model="m2", provider="p2", status="error"),
        "b1": _record(bob, project="alpha", model="m2", provider="p1"),
    }


def _ids(response) -> set[int]:
    return {r.pk for r in response.context["cl"].result_list}


@pytest.mark.parametrize(("query", "expected"), [
    ({}, {"a1", "a2", "b1"}),
    ({"project": "alpha"}, {"a1", "b1"}),
    ({"model": "m2"}, {"a2", "b1"}),
    ({"provider": "p2"}, {"a2"}),
    ({"status__exact": "error"}, {"a2"}),
])
def test_filters(operator_client, records, query, expected):
    response = operator_client.get(RECORDS, query)
    assert response.status_code == 200
    assert _ids(response) == {records[k].pk for k in expected}


def test_filter_by_user_and_date(operator_client, records):
    bob = records["b1"].user
    assert _ids(operator_client.get(RECORDS, {"user__id__exact": bob.pk})) == {records["b1"].pk}
    old = records["a1"]
    UsageRecord.objects.filter(pk=old.pk).update(created_at=timezone.now() - timedelta(days=40))
    since = (timezone.now() - timedelta(days=7)).isoformat()
    response = operator_client.get(RECORDS, {"created_at__gte": since})
    assert old.pk not in _ids(response) and records["b1"].pk in _ids(response)


def test_csv_export_of_selected_records(operator_client, records):
    formula = _record(records["a1"].user, project="=HYPERLINK(\"http://evil\")")
    response = operator_client.post(RECORDS, {
        "action": "export_csv", "_selected_action": [records["a1"].pk, records["b1"].pk, formula.pk]})
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/csv")
    assert "attachment" in response["Content-Disposition"]
    rows = list(csv.DictReader(io.StringIO(b"".join(response.streaming_content).decode())))
    assert [r["id"] for r in rows] == [str(records["a1"].pk), str(records["b1"].pk), str(formula.pk)]
    assert rows[0]["user"] == "alice" and rows[0]["cost"] == "0.1"
    assert rows[2]["project"].startswith("'=")  # no formula runs when the file is opened in a spreadsheet


def test_records_cannot_be_deleted_from_the_admin(operator_client, records):
    response = operator_client.get(RECORDS)
    assert b'value="delete_selected"' not in response.content
    assert b'value="export_csv"' in response.content


def _metered(key, model, *, debug: bool = False, **outcome) -> UsageRecord:
    """A call recorded as metering records it: hold, record, charge, the key's budget counter."""
    ctx = CallContext(user=key.user, entry_point="openai", api_key=key, debug=debug)
    request = ChatRequest(model=model.name, messages=[{"role": "user", "content": "Hi"}], max_tokens=1000)
    plan = holds.begin_call(ctx=ctx, request=request)
    record, _ = recording.record_call(meta=calls.call_meta(ctx), plan=plan,
                                     outcome=calls.CallOutcome(model=model.name, **outcome))
    return record


def test_api_keys_show_this_months_spend_and_no_hash(operator_client):
    alice = make_user("alice")
    ledger.grant_credits(user=alice, amount=Decimal("100"), reason="t", created_by=None)
    key, raw = make_api_key(alice, name="laptop")
    model = make_model("admin-priced", input_price="1000", output_price="1000")  # 0.001 per token
    _metered(key, model, status="success", prompt_tokens=1000, completion_tokens=750)  # charged 1.75
    # Neither charged nor counted against the budget, though each record has a cost: a failure before any
    # text (the upstream reported its prompt) and a staff debug run.
    _metered(key, model, status="error", prompt_tokens=1000, billable=False, error_code="upstream_error")
    _metered(key, model, debug=True, status="success", prompt_tokens=500, completion_tokens=500)
    last_month = periods.month_start(periods.day_start(periods.month_start()) - timedelta(days=1))
    ApiKeyCounter.objects.create(api_key=key, period=last_month, cost=Decimal("100"))
    assert sum(r.cost for r in UsageRecord.objects.filter(api_key=key)) == Decimal("3.75")
    budget_counter = ApiKeyCounter.objects.get(api_key=key, period=periods.month_start())
    assert budget_counter.cost == Decimal("1.75")
    response = operator_client.get(reverse("admin:usage_apikey_changelist"))
    body = response.content.decode()
    assert "1.75 CNY" in body  # what the budget counts: not 3.75 (every record) nor 101.75 (last month too)
    assert raw not in body and key.key_hash not in body
    change = operator_client.get(reverse("admin:usage_apikey_change", args=[key.pk])).content.decode()
    assert key.key_hash not in change and raw not in change
    assert "1.75 CNY" in change


def test_a_key_without_calls_this_month_shows_no_spend(operator_client):
    key, _ = make_api_key(make_user("alice"), name="idle")
    _record(key.user, api_key=key, cost=Decimal("5"), status="error")  # a record but no charge
    assert "0 CNY" in operator_client.get(reverse("admin:usage_apikey_changelist")).content.decode()


def test_revoke_action(operator_client):
    key, _ = make_api_key(make_user("alice"))
    response = operator_client.post(reverse("admin:usage_apikey_changelist"),
                                    {"action": "revoke_keys", "_selected_action": [key.pk]})
    assert response.status_code == 302
    assert ApiKey.objects.get(pk=key.pk).revoked_at is not None


def test_billing_sync_page(operator_client):
    response = operator_client.get(reverse("admin:usage_billingsyncstate_changelist"))
    assert response.status_code == 200
    assert b'id="billing-sync-panel"' in response.content


def test_running_billing_sync_needs_a_post_from_a_superuser(operator_client):
    from django.test import Client

    url = reverse("admin:usage_billingsyncstate_run")
    assert operator_client.get(url).status_code == 403
    helper = Client()
    helper.force_login(make_user("helper", staff=True))
    assert helper.post(url).status_code == 403


def test_the_sync_button_runs_the_command(operator_client, settings):
    settings.BILLING_SYNC_URL = ""  # nowhere to send: the command fails, and the page says so
    page = operator_client.get(reverse("admin:usage_billingsyncstate_changelist"))
    assert b"Run billing sync now (sync_usage)" in page.content
    response = operator_client.post(reverse("admin:usage_billingsyncstate_run"), follow=True)
    assert response.status_code == 200
    assert b"Billing sync" in response.content
