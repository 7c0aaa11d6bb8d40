"""Writer endpoints (/api/ai/…): wiring, auth, errors in our shape, metering as "writer"."""

from __future__ import annotations

from decimal import Decimal

import pytest
from asgiref.sync import sync_to_async
from django.test import AsyncClient
from rest_framework.test import APIClient

from aiwriter.money import money_str
from devtools.fake_openai import prompt_tokens
from tests.factories import make_agent, make_fake_model
from tests.fixtures_openai import FAKE_GPT_INPUT_PRICE, FAKE_GPT_OUTPUT_PRICE, make_account, start_of_a_fresh_minute
from usage.models import LedgerEntry, UsageRecord
from writer.services import parse_topics

pytestmark = pytest.mark.django_db(transaction=True)


def bearer(account) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=account.auth)
    return client


def sent_prompt(fake_upstream) -> str:
    return fake_upstream.requests[-1]["body"]["messages"][-1]["content"]


def test_generate_text_returns_text_usage_and_cost(openai_account, fake_gpt, fake_upstream):
    response = bearer(openai_account).post("/api/ai/generate-text/", {"prompt": "Write a haiku", "model": "fake-gpt"},
                                           format="json")
    assert response.status_code == 200
    body = response.json()
    assert body["text"] == "Echo. System:  | User: Write a haiku" and body["model"] == "fake-gpt"
    record = UsageRecord.objects.get(user=openai_account.user)
    assert (record.entry_point, record.workflow_type, record.api_key) == ("writer", "generate_text", openai_account.key)
    assert body["usage"] == {"prompt_tokens": record.prompt_tokens, "completion_tokens": record.completion_tokens,
                             "total_tokens": record.total_tokens, "estimated": False}
    assert body["cost"] == money_str(record.cost)
    expected = (record.prompt_tokens * Decimal(FAKE_GPT_INPUT_PRICE)
                + record.completion_tokens * Decimal(FAKE_GPT_OUTPUT_PRICE)) / Decimal(1_000_000)
    assert record.prompt_tokens == prompt_tokens([{"role": "user", "content": "Write a haiku"}])
    assert record.cost == expected.quantize(Decimal("1e-10")) > 0
    assert LedgerEntry.objects.get(usage_record=record).amount == -record.cost


def test_session_user_can_write_too(fake_gpt, fake_upstream):
    account = make_account()
    client = APIClient()
    client.force_login(account.user)
    response = client.post("/api/ai/generate-text/", {"prompt": "Hi", "model": "fake-gpt"}, format="json")
    assert response.status_code == 200
    assert UsageRecord.objects.get(user=account.user).api_key is None


def test_anonymous_is_401(fake_gpt, fake_upstream):
    response = APIClient().post("/api/ai/generate-text/", {"prompt": "Hi", "model": "fake-gpt"}, format="json")
    assert response.status_code == 401 and response.json()["error"]["code"] == "not_authenticated"
    assert fake_upstream.requests == []


def test_generate_text_caps_max_tokens(openai_account, fake_upstream):
    make_fake_model(fake_upstream, "short-gpt", max_output_tokens=4)
    response = bearer(openai_account).post("/api/ai/generate-text/",
                                           {"prompt": "Go on", "model": "short-gpt", "max_tokens": 100}, format="json")
    assert response.json()["usage"]["completion_tokens"] == 4
    assert fake_upstream.requests[0]["body"]["max_tokens"] == 4


@pytest.mark.parametrize("target", [{}, {"agent": "a", "model": "fake-gpt"}])
def test_exactly_one_of_agent_or_model(openai_account, fake_gpt, fake_upstream, target):
    response = bearer(openai_account).post("/api/ai/generate-text/", {"prompt": "Hi", **target}, format="json")
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid" and "agent" in error["fields"]


def test_unknown_model_or_agent_is_404(openai_account, fake_upstream):
    client = bearer(openai_account)
    for target in ({"model": "nope"}, {"agent": "nope"}):
        response = client.post("/api/ai/generate-text/", {"prompt": "Hi", **target}, format="json")
        assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"


def test_keys_allowed_models_apply(fake_gpt, fake_upstream):
    other = make_fake_model(fake_upstream, "other-gpt")
    account = make_account(allowed_models=[other])
    response = bearer(account).post("/api/ai/generate-text/", {"prompt": "Hi", "model": "fake-gpt"}, format="json")
    assert response.status_code == 404 and fake_upstream.requests == []


def test_agent_system_prompt_applies(openai_account, fake_gpt, fake_upstream):
    make_agent("blogger", model=fake_gpt, system_prompt="You write blog posts.")
    response = bearer(openai_account).post("/api/ai/optimize/",
                                           {"content": "teh text", "goal": "fix typos", "agent": "blogger"},
                                           format="json")
    assert response.status_code == 200
    messages = fake_upstream.requests[0]["body"]["messages"]
    assert messages[0] == {"role": "system", "content": "You write blog posts."}
    assert UsageRecord.objects.get(user=openai_account.user).agent.slug == "blogger"


def test_topics_returns_a_list(openai_account, fake_gpt, fake_upstream):
    fake_upstream.configure("fake-gpt",
                            reply='Here you go:\n1. Tea culture\n2) "Tea and health"\n- Tea culture\n\n• Brewing')
    response = bearer(openai_account).post("/api/ai/topics/", {"subject": "tea", "count": 3, "model": "fake-gpt"},
                                           format="json")
    assert response.status_code == 200
    body = response.json()
    assert body["topics"] == ["Here you go:", "Tea culture", "Tea and health"]
    assert "tea" in sent_prompt(fake_upstream) and "3 distinct topic ideas" in sent_prompt(fake_upstream)
    assert Decimal(body["cost"]) > 0 and body["usage"]["total_tokens"] > 0
    assert UsageRecord.objects.get(user=openai_account.user).workflow_type == "topics"


def test_topics_count_is_bounded(openai_account, fake_gpt, fake_upstream):
    response = bearer(openai_account).post("/api/ai/topics/", {"subject": "tea", "count": 50, "model": "fake-gpt"},
                                           format="json")
    assert response.status_code == 400 and "count" in response.json()["error"]["fields"]


def test_parse_topics_strips_markers_quotes_and_duplicates():
    assert parse_topics("1. A\n2) “B”\n* A\n## C\n\n- D", 10) == ["A", "B", "C", "D"]
    assert parse_topics("x\ny\nz", 2) == ["x", "y"]


def test_optimize_sends_goal_and_content(openai_account, fake_gpt, fake_upstream):
    fake_upstream.configure("fake-gpt", reply="The text.")
    response = bearer(openai_account).post("/api/ai/optimize/",
                                           {"content": "teh text", "goal": "fix typos", "model": "fake-gpt"},
                                           format="json")
    assert response.json()["text"] == "The text."
    prompt = sent_prompt(fake_upstream)
    assert "fix typos" in prompt and prompt.endswith("teh text")


def test_insufficient_balance_is_402_before_the_upstream(fake_gpt, fake_upstream):
    broke = make_account(credit=None)
    response = bearer(broke).post("/api/ai/generate-text/", {"prompt": "Hi", "model": "fake-gpt"}, format="json")
    assert response.status_code == 402 and response.json()["error"]["code"] == "insufficient_balance"
    assert fake_upstream.requests == []


def test_upstream_refusal_is_an_error_in_our_shape(openai_account, fake_upstream):
    make_fake_model(fake_upstream, "broken-gpt")
    fake_upstream.configure("broken-gpt", status=400)
    response = bearer(openai_account).post("/api/ai/generate-text/", {"prompt": "Hi", "model": "broken-gpt"},
                                           format="json")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "bad_request" and response.json()["error"]["retryable"] is False


async def test_keys_rate_limit_applies_with_retry_after(fake_gpt, fake_upstream, close_thread_connections):
    # AsyncClient: the whole test runs on one event loop, as under daphne (one Redis client per loop).
    account = await sync_to_async(make_account)(rpm=1)
    client = AsyncClient()
    await sync_to_async(start_of_a_fresh_minute)()
    first = await client.post("/api/ai/generate-text/", {"prompt": "Hi", "model": "fake-gpt"},
                              content_type="application/json", headers={"Authorization": account.auth})
    assert first.status_code == 200
    response = await client.post("/api/ai/topics/", {"subject": "tea", "model": "fake-gpt"},
                                 content_type="application/json", headers={"Authorization": account.auth})
    assert response.status_code == 429 and 1 <= int(response["Retry-After"]) <= 60
    assert response.json()["error"] == {"code": "rate_limited", "message": response.json()["error"]["message"],
                                        "retryable": True, "limit": "requests"}
