"""/v1 through Django's AsyncClient against the fake upstream: runs everywhere (bare SQLite too)."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from asgiref.sync import sync_to_async
from django.test import AsyncClient, override_settings

from devtools.fake_openai import prompt_tokens
from tests.factories import make_agent, make_fake_model, make_model, make_provider
from tests.fixtures_openai import make_account

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("close_thread_connections")]

MESSAGES = [{"role": "user", "content": "Hello there"}]


async def post(account, body, **headers):
    headers.setdefault("Authorization", account.auth)
    return await AsyncClient().post("/v1/chat/completions", body, content_type="application/json", headers=headers)


async def read_events(response) -> list:
    raw = b"".join([part async for part in response.streaming_content]).decode()
    events = [line.removeprefix("data: ") for line in raw.split("\n\n") if line]
    return [e if e == "[DONE]" else json.loads(e) for e in events]


async def test_completion_is_an_openai_chat_completion(openai_account, fake_gpt, fake_upstream):
    response = await post(openai_account, {"model": "fake-gpt", "messages": MESSAGES})
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == "fake-gpt" and isinstance(body["created"], int)
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Echo. System:  | User: Hello there",
                                             "refusal": None}
    assert body["choices"][0]["finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0 and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_extras_are_headers_not_body(openai_account, fake_gpt, fake_upstream):
    response = await post(openai_account, {"model": "fake-gpt", "messages": MESSAGES})
    deployment = await fake_gpt.deployments.select_related("provider").afirst()
    assert response["x-aiwriter-provider"] == deployment.provider.name
    assert response["x-aiwriter-fallback"] == "false" and response["x-aiwriter-cache"] == "miss"
    assert "E" not in response["x-aiwriter-cost"] and Decimal(response["x-aiwriter-cost"]) >= 0
    assert not {"cost", "provider", "fallback", "cache"} & set(response.json())


async def test_stream_is_role_chunk_deltas_finish_usage_done(openai_account, fake_gpt, fake_upstream):
    fake_upstream.configure("fake-gpt", tokens=12)
    response = await post(openai_account, {"model": "fake-gpt", "messages": MESSAGES, "stream": True,
                                           "stream_options": {"include_usage": True}})
    assert response.status_code == 200 and response["Content-Type"] == "text/event-stream"
    assert response["x-aiwriter-cost"] == "pending"
    events = await read_events(response)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    finish, usage = chunks[-2], chunks[-1]
    assert finish["choices"][0]["finish_reason"] == "stop" and finish["choices"][0]["delta"] == {}
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 12
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert text.startswith("Echo. System:  | User: Hello there")


async def test_stream_without_include_usage_has_no_usage_chunk(openai_account, fake_gpt, fake_upstream):
    response = await post(openai_account, {"model": "fake-gpt", "messages": MESSAGES, "stream": True})
    chunks = (await read_events(response))[:-1]
    assert all(c["choices"] and "usage" not in c for c in chunks)


async def test_list_of_parts_and_developer_role_reach_upstream_as_text(openai_account, fake_gpt, fake_upstream):
    messages = [{"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief"}]},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    response = await post(openai_account, {"model": "fake-gpt", "messages": messages})
    assert response.json()["choices"][0]["message"]["content"] == "Echo. System: Be brief | User: Hi"
    assert fake_upstream.requests[0]["body"]["messages"] == [{"role": "system", "content": "Be brief"},
                                                             {"role": "user", "content": "Hi"}]


async def test_unknown_fields_are_ignored_and_options_passed_through(openai_account, fake_gpt, fake_upstream):
    response = await post(openai_account, {
        "model": "fake-gpt", "messages": MESSAGES, "n": 1, "seed": 7, "logit_bias": {}, "some_future_field": True,
        "temperature": 0.5, "top_p": 0.9, "stop": ["\n\n"], "user": "u-1", "response_format": {"type": "text"},
    })
    assert response.status_code == 200
    sent = fake_upstream.requests[0]["body"]
    assert (sent["temperature"], sent["top_p"], sent["stop"], sent["user"]) == (0.5, 0.9, ["\n\n"], "u-1")
    assert sent["response_format"] == {"type": "text"} and "some_future_field" not in sent


async def test_max_tokens_is_capped_by_the_models_max_output_tokens(openai_account, fake_upstream):
    await sync_to_async(make_fake_model)(fake_upstream, "small-gpt", max_output_tokens=5)
    response = await post(openai_account, {"model": "small-gpt", "messages": MESSAGES, "max_tokens": 500})
    assert fake_upstream.requests[0]["body"]["max_tokens"] == 5
    body = response.json()
    assert body["usage"]["completion_tokens"] == 5 and body["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "fake-gpt", "messages": MESSAGES, "n": 2}, "n"),
    ({"messages": MESSAGES}, "model"),
    ({"model": "fake-gpt", "messages": []}, "messages"),
    ({"model": "fake-gpt", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"model": "fake-gpt", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content[0]"),
    ({"model": "fake-gpt", "messages": MESSAGES, "temperature": 3}, "temperature"),
    ({"model": "fake-gpt", "messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
])
async def test_bad_requests_are_400_with_param(openai_account, fake_gpt, fake_upstream, body, param):
    response = await post(openai_account, body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]
    assert set(error) == {"message", "type", "code", "param"}
    assert fake_upstream.requests == []


async def test_invalid_json_is_400(openai_account):
    response = await AsyncClient().post("/v1/chat/completions", "{nope", content_type="application/json",
                                        headers={"Authorization": openai_account.auth})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"


async def test_too_many_messages_is_400(openai_account, fake_gpt, fake_upstream):
    with override_settings(OPENAI_MAX_MESSAGES=3):
        response = await post(openai_account, {"model": "fake-gpt", "messages": MESSAGES * 4})
    assert response.status_code == 400 and response.json()["error"]["code"] == "too_many_messages"


async def test_body_over_the_limit_is_413(openai_account, fake_gpt, fake_upstream):
    with override_settings(DATA_UPLOAD_MAX_MEMORY_SIZE=1000):
        response = await post(openai_account, {"model": "fake-gpt",
                                               "messages": [{"role": "user", "content": "x" * 2000}]})
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    assert fake_upstream.requests == []


async def test_prompt_over_the_context_window_is_400(openai_account, fake_upstream):
    await sync_to_async(make_fake_model)(fake_upstream, "tiny-ctx", context_window=50)
    response = await post(openai_account, {"model": "tiny-ctx",
                                           "messages": [{"role": "user", "content": "word " * 80}]})
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
    assert fake_upstream.requests == []


@pytest.mark.parametrize("authorization", [None, "Bearer aiw_not-a-key", "Basic abc"])
async def test_missing_or_bad_key_is_401(fake_gpt, fake_upstream, authorization):
    headers = {"Authorization": authorization} if authorization else {}
    response = await AsyncClient().post("/v1/chat/completions", {"model": "fake-gpt", "messages": MESSAGES},
                                        content_type="application/json", headers=headers)
    assert response.status_code == 401
    assert response.json()["error"] == {"message": response.json()["error"]["message"],
                                        "type": "invalid_request_error", "code": "invalid_api_key", "param": None}


async def test_unknown_model_is_404(openai_account, fake_upstream):
    response = await post(openai_account, {"model": "no-such-model", "messages": MESSAGES})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found" and response.json()["error"]["param"] == "model"
    response = await post(openai_account, {"model": "agent:no-such-agent", "messages": MESSAGES})
    assert response.status_code == 404


async def test_model_outside_the_keys_allowed_models_is_404(fake_gpt, fake_upstream):
    other = await sync_to_async(make_fake_model)(fake_upstream, "other-gpt")
    account = await sync_to_async(make_account)(allowed_models=[other])
    assert (await post(account, {"model": "fake-gpt", "messages": MESSAGES})).status_code == 404
    assert (await post(account, {"model": "other-gpt", "messages": MESSAGES})).status_code == 200
    assert [r["model"] for r in fake_upstream.requests] == ["other-gpt"]


async def test_agent_runs_with_its_system_prompt(openai_account, fake_gpt, fake_upstream):
    await sync_to_async(make_agent)("editor", model=fake_gpt, system_prompt="You edit for {user}.")
    response = await post(openai_account, {"model": "agent:editor", "messages": MESSAGES})
    username = openai_account.user.username
    assert response.json()["choices"][0]["message"]["content"] == (
        f"Echo. System: You edit for {username}. | User: Hello there")
    assert response.json()["model"] == "agent:editor"


async def test_method_not_allowed_is_405_in_openai_shape(openai_account):
    response = await AsyncClient().get("/v1/chat/completions", headers={"Authorization": openai_account.auth})
    assert response.status_code == 405 and response.json()["error"]["code"] == "method_not_allowed"


async def test_models_lists_models_and_agents(openai_account, fake_gpt, fake_upstream):
    await sync_to_async(make_agent)("editor", model=fake_gpt)
    response = await AsyncClient().get("/v1/models", headers={"Authorization": openai_account.auth})
    body = response.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["fake-gpt", "agent:editor"]
    assert all(m["object"] == "model" and isinstance(m["created"], int) for m in body["data"])
    one = await AsyncClient().get("/v1/models/agent:editor", headers={"Authorization": openai_account.auth})
    assert one.json()["id"] == "agent:editor"


async def test_models_shows_a_restricted_key_only_its_models(fake_gpt, fake_upstream):
    other = await sync_to_async(make_fake_model)(fake_upstream, "other-gpt")
    await sync_to_async(make_agent)("on-fake", model=fake_gpt)
    await sync_to_async(make_agent)("on-other", model=other)
    account = await sync_to_async(make_account)(allowed_models=[other])
    response = await AsyncClient().get("/v1/models", headers={"Authorization": account.auth})
    assert [m["id"] for m in response.json()["data"]] == ["other-gpt", "agent:on-other"]
    missing = await AsyncClient().get("/v1/models/fake-gpt", headers={"Authorization": account.auth})
    assert missing.status_code == 404


async def test_models_needs_a_key():
    assert (await AsyncClient().get("/v1/models")).status_code == 401


def _fragile_model(fake_upstream, name: str, **provider_fields):
    provider = make_provider(kind="openai", base_url=fake_upstream.base_url, api_key="sk-fake", max_retries=0,
                             **provider_fields)
    return make_fake_model(fake_upstream, name, provider=provider)


async def test_upstream_server_error_is_502(openai_account, fake_upstream):
    await sync_to_async(_fragile_model)(fake_upstream, "flaky-gpt")
    fake_upstream.configure("flaky-gpt", status=500)
    response = await post(openai_account, {"model": "flaky-gpt", "messages": MESSAGES})
    assert response.status_code == 502
    assert response.json()["error"]["type"] == "upstream_error" and response.json()["error"]["param"] is None


async def test_upstream_timeout_is_504(openai_account, fake_upstream):
    await sync_to_async(_fragile_model)(fake_upstream, "slow-gpt", timeout=0.3)
    fake_upstream.configure("slow-gpt", hang=True)
    response = await post(openai_account, {"model": "slow-gpt", "messages": MESSAGES})
    assert response.status_code == 504


async def test_upstream_rate_limit_is_429_with_retry_after(openai_account, fake_upstream):
    await sync_to_async(_fragile_model)(fake_upstream, "busy-gpt")
    fake_upstream.configure("busy-gpt", status=429, retry_after=3)
    response = await post(openai_account, {"model": "busy-gpt", "messages": MESSAGES, "stream": True})
    assert response.status_code == 429 and response["Retry-After"] == "3"


async def test_failure_after_the_stream_started_is_an_error_event(openai_account, fake_upstream):
    await sync_to_async(_fragile_model)(fake_upstream, "cut-gpt")
    fake_upstream.configure("cut-gpt", tokens=30, cut_after=4)
    response = await post(openai_account, {"model": "cut-gpt", "messages": MESSAGES, "stream": True})
    assert response.status_code == 200
    events = await read_events(response)
    assert [e["choices"][0]["delta"].get("content") for e in events[1:5]] == ["Echo", ".", " System", ":"]
    assert set(events[-1]) == {"error"} and events[-1]["error"]["type"] == "upstream_error"


async def test_usage_is_counted_when_the_upstream_reports_none(openai_account, fake_gpt, fake_upstream):
    fake_upstream.configure("fake-gpt", omit_usage=True, tokens=9)
    body = (await post(openai_account, {"model": "fake-gpt", "messages": MESSAGES})).json()
    assert body["usage"]["prompt_tokens"] == prompt_tokens(MESSAGES) and body["usage"]["completion_tokens"] == 9
    response = await post(openai_account, {"model": "fake-gpt", "messages": MESSAGES, "stream": True,
                                           "stream_options": {"include_usage": True}})
    usage = (await read_events(response))[-2]["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (prompt_tokens(MESSAGES), 9)


async def test_cache_hit_shows_in_the_headers_and_costs_nothing(openai_account, fake_gpt, fake_upstream):
    body = {"model": "fake-gpt", "messages": MESSAGES, "temperature": 0}
    first = await post(openai_account, body)
    second = await post(openai_account, body)
    assert first["x-aiwriter-cache"] == "miss" and Decimal(first["x-aiwriter-cost"]) > 0
    assert second["x-aiwriter-cache"] == "hit" and second["x-aiwriter-cost"] == "0"
    assert second.json()["choices"][0]["message"] == first.json()["choices"][0]["message"]
    assert len(fake_upstream.requests) == 1


async def test_fallback_shows_in_the_headers(openai_account, fake_gpt, fake_upstream):
    broken = await sync_to_async(_fragile_model)(fake_upstream, "down-gpt")
    fake_upstream.configure("down-gpt", status=500)
    await sync_to_async(make_agent)("resilient", model=broken, fallback_model=fake_gpt)
    response = await post(openai_account, {"model": "agent:resilient", "messages": MESSAGES})
    assert response.status_code == 200 and response["x-aiwriter-fallback"] == "true"
    assert response.json()["model"] == "agent:resilient"
    assert fake_upstream.requests[-1]["model"] == "fake-gpt"


async def test_spent_key_budget_is_429_insufficient_quota_not_retried(fake_gpt, fake_upstream):
    account = await sync_to_async(make_account)(monthly_budget=Decimal("0.0000000001"))
    assert (await post(account, {"model": "fake-gpt", "messages": MESSAGES})).status_code == 200  # spends it
    response = await post(account, {"model": "fake-gpt", "messages": MESSAGES})
    assert response.status_code == 429 and response["x-should-retry"] == "false"
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("insufficient_quota", "key_budget_exceeded")
    assert len(fake_upstream.requests) == 1


async def test_empty_balance_is_402_not_retried(fake_gpt, fake_upstream):
    account = await sync_to_async(make_account)(credit=None)
    response = await post(account, {"model": "fake-gpt", "messages": MESSAGES, "stream": True})
    assert response.status_code == 402 and response["x-should-retry"] == "false"
    assert response.json()["error"]["code"] == "insufficient_balance" and fake_upstream.requests == []


async def test_max_completion_tokens_is_sent_upstream_and_wins_over_max_tokens(openai_account, fake_gpt,
                                                                                 fake_upstream):
    response = await post(openai_account, {"model": "fake-gpt", "messages": MESSAGES, "max_completion_tokens": 3})
    assert fake_upstream.requests[-1]["body"]["max_tokens"] == 3
    body = response.json()
    assert body["usage"]["completion_tokens"] == 3 and body["choices"][0]["finish_reason"] == "length"
    await post(openai_account, {"model": "fake-gpt", "messages": MESSAGES, "max_tokens": 9,
                                "max_completion_tokens": 2})
    assert fake_upstream.requests[-1]["body"]["max_tokens"] == 2


async def test_stream_options_without_stream_is_ignored(openai_account, fake_gpt, fake_upstream):
    response = await post(openai_account, {"model": "fake-gpt", "messages": MESSAGES,
                                           "stream_options": {"include_usage": True}, "stream": False})
    assert response.status_code == 200 and response.json()["object"] == "chat.completion"
    assert response.json()["usage"]["total_tokens"] > 0


@pytest.mark.parametrize("field", ["expires_at", "revoked_at"])
async def test_expired_or_revoked_key_is_401(fake_gpt, fake_upstream, field):
    from django.utils import timezone

    account = await sync_to_async(make_account)(**{field: timezone.now()})
    response = await post(account, {"model": "fake-gpt", "messages": MESSAGES})
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    models = await AsyncClient().get("/v1/models", headers={"Authorization": account.auth})
    assert models.status_code == 401 and fake_upstream.requests == []


async def test_usage_is_attributed_to_the_keys_user_and_project(fake_gpt, fake_upstream):
    from usage.models import UsageRecord

    account = await sync_to_async(make_account)(project="newsletter")
    response = await post(account, {"model": "fake-gpt", "messages": MESSAGES, "stream": True})
    await read_events(response)
    response = await post(account, {"model": "fake-gpt", "messages": MESSAGES})
    records = [r async for r in UsageRecord.objects.filter(api_key=account.key)]
    assert [(r.user_id, r.project, r.entry_point) for r in records] == [(account.user.pk, "newsletter", "openai")] * 2


async def test_agent_on_a_model_outside_the_keys_allowed_models_is_404(fake_gpt, fake_upstream):
    other = await sync_to_async(make_fake_model)(fake_upstream, "other-gpt")
    await sync_to_async(make_agent)("on-fake", model=fake_gpt)
    await sync_to_async(make_agent)("on-other", model=other)
    account = await sync_to_async(make_account)(allowed_models=[other])
    assert (await post(account, {"model": "agent:on-fake", "messages": MESSAGES})).status_code == 404
    assert (await post(account, {"model": "agent:on-other", "messages": MESSAGES})).status_code == 200
    assert [r["model"] for r in fake_upstream.requests] == ["other-gpt"]


async def test_balance_and_budget_errors_have_openais_shape(fake_gpt, fake_upstream):
    account = await sync_to_async(make_account)(credit=None)
    response = await post(account, {"model": "fake-gpt", "messages": MESSAGES})
    assert response.status_code == 402
    assert response.json() == {"error": {"message": response.json()["error"]["message"], "type": "insufficient_quota",
                                         "code": "insufficient_balance", "param": None}}


@pytest.mark.parametrize("project", ["", "newsletter"])
async def test_used_up_monthly_quota_is_429_insufficient_quota_before_the_upstream(fake_gpt, fake_upstream, project):
    from usage.models import Quota

    account = await sync_to_async(make_account)(project=project)
    await Quota.objects.acreate(user=account.user, project=project, monthly_token_limit=1)
    assert (await post(account, {"model": "fake-gpt", "messages": MESSAGES})).status_code == 200  # under it before
    response = await post(account, {"model": "fake-gpt", "messages": MESSAGES, "stream": True})
    assert response.status_code == 429 and response["x-should-retry"] == "false"
    error = response.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("insufficient_quota", "quota_exceeded", None)
    assert len(fake_upstream.requests) == 1


async def test_disabled_models_and_agents_are_neither_listed_nor_served(openai_account, fake_gpt, fake_upstream):
    off = await sync_to_async(make_fake_model)(fake_upstream, "off-gpt", enabled=False)
    await sync_to_async(make_agent)("on-off-model", model=off)
    await sync_to_async(make_agent)("switched-off", model=fake_gpt, enabled=False)
    listed = await AsyncClient().get("/v1/models", headers={"Authorization": openai_account.auth})
    assert [m["id"] for m in listed.json()["data"]] == ["fake-gpt"]
    for name in ("off-gpt", "agent:on-off-model", "agent:switched-off"):
        assert (await post(openai_account, {"model": name, "messages": MESSAGES})).status_code == 404, name
    assert fake_upstream.requests == []


@pytest.mark.parametrize("method", ["get", "post"])
async def test_unknown_v1_path_is_404_in_openai_shape(openai_account, method):
    response = await getattr(AsyncClient(), method)("/v1/embeddings", headers={"Authorization": openai_account.auth})
    assert response.status_code == 404
    assert response.json() == {"error": {"message": f"Invalid URL ({method.upper()} /v1/embeddings)",
                                         "type": "invalid_request_error", "code": None, "param": None}}


async def test_a_bug_is_500_in_openai_shape(openai_account, fake_gpt, fake_upstream, monkeypatch):
    from openai_compat import calls

    async def broken(**kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(calls, "prepare_call", broken)  # stands in for any bug below the view
    response = await post(openai_account, {"model": "fake-gpt", "messages": MESSAGES})
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "server_error" and "a bug" not in response.content.decode()
    assert response["x-should-retry"] == "false"  # the call may have been billed: the SDK must not repeat it


async def test_message_over_the_character_limit_is_400_in_openai_shape(openai_account, fake_gpt, fake_upstream):
    parts = [{"type": "text", "text": "12345"}, {"type": "text", "text": "67890"}]  # joined: 10 characters
    longer = [*parts, {"type": "text", "text": "!"}]
    with override_settings(OPENAI_MAX_MESSAGE_CHARS=10):
        at_limit = await post(openai_account, {"model": "fake-gpt", "messages": [{"role": "user", "content": parts}]})
        over = await post(openai_account, {"model": "fake-gpt", "stream": True, "messages": [
            {"role": "user", "content": "short"}, {"role": "user", "content": longer}]})
    assert at_limit.status_code == 200
    assert over.status_code == 400
    assert over.json() == {"error": {"message": "A message may hold at most 10 characters.",
                                     "type": "invalid_request_error", "code": "string_above_max_length",
                                     "param": "messages[1].content"}}
    assert len(fake_upstream.requests) == 1


def _served_headers(response) -> tuple[str, str, str]:
    return response["x-aiwriter-provider"], response["x-aiwriter-fallback"], response["x-aiwriter-cache"]


async def test_stream_headers_name_the_provider_fallback_and_cache_hit(openai_account, fake_gpt, fake_upstream):
    deployment = await fake_gpt.deployments.select_related("provider").afirst()
    body = {"model": "fake-gpt", "messages": MESSAGES, "temperature": 0, "stream": True}
    first = await post(openai_account, body)
    assert first["x-aiwriter-cost"] == "pending"
    assert _served_headers(first) == (deployment.provider.name, "false", "miss")
    await read_events(first)
    again = await post(openai_account, body)  # the same deterministic request: from the response cache
    assert again["x-aiwriter-cost"] == "pending"
    assert _served_headers(again) == (deployment.provider.name, "false", "hit")
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in (await read_events(again))[:-1]) == (
        "Echo. System:  | User: Hello there")
    assert len(fake_upstream.requests) == 1


async def test_stream_headers_say_when_the_fallback_serves_it(openai_account, fake_gpt, fake_upstream):
    from usage.models import UsageRecord

    broken = await sync_to_async(_fragile_model)(fake_upstream, "down-gpt")
    fake_upstream.configure("down-gpt", status=500)
    await sync_to_async(make_agent)("resilient", model=broken, fallback_model=fake_gpt)
    response = await post(openai_account, {"model": "agent:resilient", "messages": MESSAGES, "stream": True})
    assert response.status_code == 200 and response["x-aiwriter-fallback"] == "true"
    await read_events(response)
    record = await UsageRecord.objects.aget(api_key=openai_account.key)
    assert record.fallback and response["x-aiwriter-provider"] == record.provider
    assert response["x-aiwriter-cache"] == "miss" and [r["model"] for r in fake_upstream.requests][-1] == "fake-gpt"


async def test_empty_stream_still_names_who_served_it(openai_account, fake_gpt, fake_upstream):
    fake_upstream.configure("fake-gpt", reply="")
    response = await post(openai_account, {"model": "fake-gpt", "messages": MESSAGES, "stream": True})
    deployment = await fake_gpt.deployments.select_related("provider").afirst()
    assert _served_headers(response) == (deployment.provider.name, "false", "miss")
    assert response["x-aiwriter-cost"] == "pending"
    events = await read_events(response)
    assert events[-2]["choices"][0]["finish_reason"] == "stop" and events[-1] == "[DONE]"


@pytest.mark.parametrize("reason", ["content_filter", "length"])
async def test_the_upstreams_finish_reason_is_passed_through(openai_account, fake_gpt, fake_upstream, reason):
    fake_upstream.configure("fake-gpt", finish_reason=reason)  # without max_tokens we would say "stop"
    body = (await post(openai_account, {"model": "fake-gpt", "messages": MESSAGES})).json()
    assert body["choices"][0]["finish_reason"] == reason
    response = await post(openai_account, {"model": "fake-gpt", "messages": MESSAGES, "stream": True,
                                           "stream_options": {"include_usage": True}})
    finish = (await read_events(response))[-3]
    assert finish["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": reason}]


async def test_finish_reason_is_ours_when_the_upstream_gives_none(openai_account, fake_upstream):
    await sync_to_async(make_model)("demo-small")  # the demo provider reports no finish_reason
    capped = await post(openai_account, {"model": "demo-small", "messages": MESSAGES, "max_tokens": 3})
    assert capped.json()["choices"][0]["finish_reason"] == "length"
    assert capped.json()["usage"]["completion_tokens"] == 3
    whole = await post(openai_account, {"model": "demo-small", "messages": MESSAGES, "stream": True})
    assert (await read_events(whole))[-2]["choices"][0]["finish_reason"] == "stop"


async def test_an_agents_fallback_outside_the_keys_models_is_not_used(fake_gpt, fake_upstream):
    from usage.models import UsageRecord

    broken = await sync_to_async(_fragile_model)(fake_upstream, "down-gpt")
    fake_upstream.configure("down-gpt", status=500)
    await sync_to_async(make_agent)("resilient", model=broken, fallback_model=fake_gpt)
    narrow = await sync_to_async(make_account)(allowed_models=[broken])
    wide = await sync_to_async(make_account)(allowed_models=[broken, fake_gpt])
    for stream in (False, True):
        refused = await post(narrow, {"model": "agent:resilient", "messages": MESSAGES, "stream": stream})
        assert refused.status_code == 502 and refused.json()["error"]["type"] == "upstream_error"
    assert {r["model"] for r in fake_upstream.requests} == {"down-gpt"}
    served = await post(wide, {"model": "agent:resilient", "messages": MESSAGES})
    assert served.status_code == 200 and served["x-aiwriter-fallback"] == "true"
    assert fake_upstream.requests[-1]["model"] == "fake-gpt"
    records = [r async for r in UsageRecord.objects.filter(api_key=narrow.key)]
    assert [(r.status, r.fallback, r.charged) for r in records] == [("error", False, False)] * 2
