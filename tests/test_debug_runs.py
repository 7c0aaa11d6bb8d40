"""Staff debug runs: route test, prompt preview (no call), execution test (cost logged, never charged)."""

from decimal import Decimal

import pytest
from asgiref.sync import sync_to_async

from tests.factories import make_agent, make_fake_model, make_model, make_user
from usage import debug
from usage.billing.ledger import grant_credits
from usage.models import AdminDebugLog, CreditAccount, LedgerEntry, UsageCounter, UsageRecord


@pytest.mark.django_db
def test_route_test_reports_deployments_and_choice_without_a_call(api_client):
    agent = make_agent("helper", model=make_model("routed"))
    api_client.force_authenticate(make_user(staff=True))
    body = api_client.post("/api/agents/helper/debug/route/", {}, format="json").json()
    assert body["action"] == "route" and body["result"]["strategy"] == "weighted"
    assert body["result"]["chosen"]["upstream_model"] == "routed" and body["cost"] == "0"
    assert not UsageRecord.objects.exists() and AdminDebugLog.objects.get().agent == agent


@pytest.mark.django_db
def test_prompt_preview_shows_the_exact_messages(api_client):
    make_agent("writer", system_prompt="You write for {user}.")
    staff = make_user("boss", staff=True)
    api_client.force_authenticate(staff)
    body = api_client.post("/api/agents/writer/debug/preview/",
                           {"messages": [{"role": "user", "content": "Hi"}]}, format="json").json()
    assert body["result"]["messages"] == [{"role": "system", "content": "You write for boss."},
                                          {"role": "user", "content": "Hi"}]
    assert body["prompt_tokens"] > 0 and not UsageRecord.objects.exists()


@pytest.mark.django_db
def test_debug_endpoints_are_staff_only_and_404_for_unknown_agents(api_client):
    make_agent("helper")
    api_client.force_authenticate(make_user())
    assert api_client.post("/api/agents/helper/debug/run/", {}, format="json").status_code == 403
    api_client.force_authenticate(make_user(staff=True))
    assert api_client.post("/api/agents/nope/debug/route/", {}, format="json").status_code == 404
    bad = api_client.post("/api/agents/helper/debug/preview/", {"messages": [{"role": "x"}]}, format="json")
    assert bad.status_code == 400


@pytest.mark.django_db(transaction=True)
async def test_execution_cost_is_logged_and_never_charged_nor_counted(fake_upstream, close_thread_connections):
    staff = await sync_to_async(make_user)(staff=True)
    await sync_to_async(grant_credits)(user=staff, amount=Decimal("1"), reason="t", created_by=None)
    model = await sync_to_async(make_fake_model)(fake_upstream, "debugged", input_price="5", output_price="15")
    fake_upstream.configure("debugged", tokens=12)
    agent = await sync_to_async(make_agent)("dbg", model=model)
    log = await sync_to_async(debug.execution_test)(agent=agent, staff_user=staff,
                                                    messages=[{"role": "user", "content": "ping"}])

    def check():
        record = UsageRecord.objects.get()
        assert log.action == "run" and log.result["ok"] and log.completion_tokens == 12
        assert log.cost == record.cost > 0 and record.debug and not record.charged
        assert CreditAccount.objects.get(user=staff).balance == 1
        assert LedgerEntry.objects.filter(kind="charge").count() == 0
        assert not UsageCounter.objects.exists()

    await sync_to_async(check)()
