"""An agent's debug page in the admin: route test, prompt preview and execution test, with the logged cost."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.urls import reverse

from aiwriter.money import money_str
from tests.factories import make_agent, make_fake_model
from usage.models import AdminDebugLog, LedgerEntry, UsageRecord

pytestmark = pytest.mark.django_db


@pytest.fixture
def agent(fake_upstream):
    model = make_fake_model(fake_upstream, "debug-model", input_price="1000", output_price="2000")
    fake_upstream.configure("debug-model", reply="Hello from the <b>debug</b> run.")
    return make_agent("writer", model=model, system_prompt="You help {user}.")


def _url(agent) -> str:
    return reverse("admin:agents_agent_debug", args=[agent.pk])


def test_debug_page_renders_with_a_link_from_the_list(operator_client, agent):
    assert _url(agent).encode() in operator_client.get(reverse("admin:agents_agent_changelist")).content
    response = operator_client.get(_url(agent))
    assert response.status_code == 200
    assert b'id="debug-form"' in response.content and b"No debug runs yet." in response.content


def test_execution_test_shows_the_result_and_its_logged_cost(operator_client, operator, agent):
    response = operator_client.post(_url(agent), {"action": "run", "message": "Say hi"})
    assert response.status_code == 200
    log = AdminDebugLog.objects.get()
    assert (log.action, log.staff_user, log.agent) == ("run", operator, agent)
    assert log.cost > 0 and log.prompt_tokens > 0 and log.completion_tokens > 0
    body = response.content.decode()
    assert 'id="debug-result"' in body
    assert f'<td class="debug-cost">{money_str(log.cost)}</td>' in body
    assert "Hello from the &lt;b&gt;debug&lt;/b&gt; run." in body  # the reply is shown as text
    # Logged with its cost, charged to nobody.
    record = UsageRecord.objects.get()
    assert record.debug and record.cost == log.cost
    assert not LedgerEntry.objects.exists()


def test_prompt_preview_shows_the_filled_system_prompt(operator_client, agent):
    response = operator_client.post(_url(agent), {"action": "preview", "message": "Draft a note"})
    body = response.content.decode()
    assert "You help operator." in body and "Draft a note" in body
    assert AdminDebugLog.objects.get().action == "preview"
    assert not UsageRecord.objects.exists()


def test_route_test_names_the_deployment(operator_client, agent):
    response = operator_client.post(_url(agent), {"action": "route"})
    assert response.status_code == 200
    log = AdminDebugLog.objects.get()
    assert log.action == "route" and log.cost == Decimal("0")
    assert log.provider and log.provider in response.content.decode()


def test_a_failing_model_shows_its_error(operator_client, agent, fake_upstream):
    fake_upstream.configure("debug-model", status=400)
    response = operator_client.post(_url(agent), {"action": "run", "message": "x"})
    assert response.status_code == 200
    log = AdminDebugLog.objects.get()
    assert log.result["ok"] is False
    assert 'id="debug-error">The call failed: bad_request' in response.content.decode()


def test_runs_appear_in_the_debug_log_admin(operator_client, agent):
    operator_client.post(_url(agent), {"action": "run", "message": "Say hi"})
    response = operator_client.get(reverse("admin:usage_admindebuglog_changelist"))
    assert response.status_code == 200
    assert b"Execution test" in response.content and b"debug-model" in response.content


def test_the_debug_tool_shows_its_result_as_fields_not_a_json_blob(operator_client, agent):
    """Issue 14: debug runs shown readably, on the tool's page as in the debug log."""
    body = operator_client.post(_url(agent), {"action": "preview", "message": "Draft <a> note"}).content.decode()
    fields = body.split('id="debug-fields">')[1].split('<p><a href=')[0]
    assert '<div class="aiw-message"><strong>system</strong>' in fields
    assert '<div class="aiw-text">Draft &lt;a&gt; note</div>' in fields  # the user's text, escaped
    assert "<tr><th>prompt_tokens</th>" in fields
    assert "&quot;messages&quot;" not in body and '"messages":' not in body  # no JSON blob
    body = operator_client.post(_url(agent), {"action": "run", "message": "Say hi"}).content.decode()
    fields = body.split('id="debug-fields">')[1].split('<p><a href=')[0]
    assert "<tr><th>finish_reason</th><td>stop</td></tr>" in fields and "<tr><th>content</th>" not in fields
