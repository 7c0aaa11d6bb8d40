"""Each writer endpoint, with an agent or a model, is routed, limited and charged like chat (entry point "writer")."""

from __future__ import annotations

from decimal import Decimal

import pytest
from rest_framework.test import APIClient

from aiwriter.money import money_str
from devtools.fake_openai import prompt_tokens
from tests.factories import make_agent, make_fake_model, make_provider
from tests.fixtures_openai import FAKE_GPT_INPUT_PRICE, FAKE_GPT_OUTPUT_PRICE, make_account
from usage.models import CreditAccount, LedgerEntry, UsageRecord

pytestmark = pytest.mark.django_db(transaction=True)

ENDPOINTS = {
    "generate_text": ("/api/ai/generate-text/", {"prompt": "Write a haiku about tea"}),
    "topics": ("/api/ai/topics/", {"subject": "tea", "count": 3}),
    "optimize": ("/api/ai/optimize/", {"content": "teh text", "goal": "fix typos"}),
}


def bearer(account) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=account.auth)
    return client


def expected_cost(prompt: int, completion: int) -> Decimal:
    raw = prompt * Decimal(FAKE_GPT_INPUT_PRICE) + completion * Decimal(FAKE_GPT_OUTPUT_PRICE)
    return (raw / Decimal(1_000_000)).quantize(Decimal("1e-10"))


@pytest.mark.parametrize("target", ["model", "agent"])
@pytest.mark.parametrize("workflow", list(ENDPOINTS))
def test_each_endpoint_is_metered_and_charged_exactly(fake_gpt, fake_upstream, workflow, target):
    agent = make_agent("blogger", model=fake_gpt, system_prompt="You write for {project}.")
    account = make_account(project="blog")
    path, body = ENDPOINTS[workflow]
    chosen = {"model": "fake-gpt"} if target == "model" else {"agent": "blogger"}
    response = bearer(account).post(path, {**body, **chosen}, format="json")
    assert response.status_code == 200, response.content

    sent = fake_upstream.requests[-1]["body"]["messages"]
    if target == "agent":
        assert sent[0] == {"role": "system", "content": "You write for blog."}
    else:
        assert [m["role"] for m in sent] == ["user"]
    record = UsageRecord.objects.get(api_key=account.key)
    assert (record.user, record.project, record.entry_point, record.workflow_type) == (
        account.user, "blog", "writer", workflow)
    assert record.agent == (agent if target == "agent" else None)
    assert (record.status, record.token_source, record.model) == ("success", "measured", "fake-gpt")
    assert record.prompt_tokens == prompt_tokens(sent)
    assert record.cost == expected_cost(record.prompt_tokens, record.completion_tokens) > 0
    answer = response.json()
    assert answer["cost"] == money_str(record.cost) and answer["model"] == "fake-gpt"
    assert answer["usage"] == {"prompt_tokens": record.prompt_tokens, "completion_tokens": record.completion_tokens,
                               "total_tokens": record.total_tokens, "estimated": False}
    entry = LedgerEntry.objects.get(usage_record=record)
    assert entry.kind == LedgerEntry.Kind.CHARGE and entry.amount == -record.cost
    assert CreditAccount.objects.get(user=account.user).balance == Decimal("100") - record.cost


@pytest.mark.parametrize("workflow", list(ENDPOINTS))
def test_spent_key_budget_is_429_before_the_upstream(fake_gpt, fake_upstream, workflow):
    account = make_account(monthly_budget=Decimal("0.0000000001"))
    path, body = ENDPOINTS[workflow]
    assert bearer(account).post(path, {**body, "model": "fake-gpt"}, format="json").status_code == 200
    response = bearer(account).post(path, {**body, "model": "fake-gpt"}, format="json")
    assert response.status_code == 429 and response.json()["error"]["code"] == "key_budget_exceeded"
    assert len(fake_upstream.requests) == 1 and UsageRecord.objects.filter(api_key=account.key).count() == 1


def _fragile_model(fake_upstream, name: str, **provider_fields):
    provider = make_provider(kind="openai", base_url=fake_upstream.base_url, api_key="sk-fake", max_retries=0,
                             **provider_fields)
    return make_fake_model(fake_upstream, name, provider=provider)


def test_upstream_failure_is_502_and_timeout_504_in_our_shape(openai_account, fake_upstream):
    _fragile_model(fake_upstream, "flaky-gpt")
    fake_upstream.configure("flaky-gpt", status=500)
    _fragile_model(fake_upstream, "slow-gpt", timeout=0.3)
    fake_upstream.configure("slow-gpt", hang=True)
    client = bearer(openai_account)
    failed = client.post("/api/ai/topics/", {"subject": "tea", "model": "flaky-gpt"}, format="json")
    assert failed.status_code == 502 and set(failed.json()["error"]) >= {"code", "message", "retryable"}
    slow = client.post("/api/ai/optimize/", {"content": "x", "goal": "y", "model": "slow-gpt"}, format="json")
    assert slow.status_code == 504 and slow.json()["error"]["code"] == "upstream_timeout"
    # Failed calls are recorded, not charged.
    records = UsageRecord.objects.filter(api_key=openai_account.key)
    assert {r.status for r in records} == {"error"} and not LedgerEntry.objects.filter(kind="charge").exists()


def test_upstream_rate_limit_is_429_with_retry_after(openai_account, fake_upstream):
    _fragile_model(fake_upstream, "busy-gpt")
    fake_upstream.configure("busy-gpt", status=429, retry_after=3)
    response = bearer(openai_account).post("/api/ai/generate-text/", {"prompt": "Hi", "model": "busy-gpt"},
                                           format="json")
    assert response.status_code == 429 and response["Retry-After"] == "3"
    assert response.json()["error"]["retryable"] is True
