"""A whole reply (service `whole=True`: /v1 without `stream`, the writer, debug runs) is asked of an OpenAI-compatible
upstream as one non-streamed request (agents/llm/providers.py `complete`); a streamed call still streams. The reply,
its function calls, usage and finish_reason come out as the stream gave them, and a body cut midway or not JSON is
a failed attempt like a cut or malformed stream."""

from __future__ import annotations

import pytest
from asgiref.sync import sync_to_async

from agents.llm import service, tokens
from agents.llm.providers import OpenAICompatibleProvider
from agents.llm.types import ChatRequest, LLMError
from tests.factories import make_fake_model

pytestmark = pytest.mark.django_db(transaction=True)

MESSAGES = [{"role": "system", "content": "You are a poet."}, {"role": "user", "content": "Write about rivers"}]
TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}]


@pytest.fixture
async def model(fake_upstream):
    return await sync_to_async(make_fake_model)(fake_upstream, "whole-m", upstream_model="w")


async def _streamed(request: ChatRequest):
    items = [item async for item in service.stream(request)]
    return items[-1]


async def test_a_whole_reply_is_one_non_streamed_request_with_what_the_stream_gives(fake_upstream, model):
    fake_upstream.configure("w", tokens=30, cached_tokens=4)
    request = ChatRequest(model=model.name, messages=MESSAGES, max_tokens=100, temperature=0.5)
    whole = await service.complete(request)
    body = fake_upstream.requests_for("w")[-1]["body"]
    assert body["stream"] is False and "stream_options" not in body
    assert body["temperature"] == 0.5 and body["max_tokens"] == 100 and body["messages"] == MESSAGES

    streamed = await _streamed(request)
    assert fake_upstream.requests_for("w")[-1]["body"]["stream"] is True  # a streamed call still streams
    assert whole.content == streamed.content and whole.content.startswith("Echo")
    assert whole.usage == streamed.usage and whole.usage.source == "measured"
    assert (whole.usage.completion_tokens, whole.usage.cached_prompt_tokens) == (30, 4)
    assert whole.finish_reason == streamed.finish_reason == "stop" and whole.tool_calls is None


async def test_a_whole_reply_without_usage_is_estimated_and_keeps_the_upstreams_finish_reason(fake_upstream, model):
    fake_upstream.configure("w", tokens=12, omit_usage=True, finish_reason="content_filter")
    result = await service.complete(ChatRequest(model=model.name, messages=MESSAGES))
    assert result.usage.source == "estimated"
    assert result.usage.completion_tokens == tokens.count_text(result.content, "w")
    assert result.finish_reason == "content_filter"


async def test_a_whole_function_call_is_the_same_as_the_streamed_one(fake_upstream, model):
    request = ChatRequest(model=model.name, messages=MESSAGES, tools=TOOLS)
    whole = await service.complete(request)
    streamed = await _streamed(request)
    assert [{**c, "id": ""} for c in whole.tool_calls] == [{**c, "id": ""} for c in streamed.tool_calls]
    call = whole.tool_calls[0]
    assert set(call) == {"id", "type", "function"} and call["id"].startswith("call_fake")
    assert call["function"]["name"] == "lookup"
    assert '"echo"' in call["function"]["arguments"]
    assert whole.finish_reason == "tool_calls" and whole.content == ""
    assert whole.usage == streamed.usage


@pytest.mark.parametrize(("fault", "code"), [({"cut_after": 3}, "upstream_unavailable"),
                                             ({"malformed": True}, "upstream_bad_response")])
async def test_a_whole_reply_cut_or_malformed_fails_without_text_then_is_retried(fake_upstream, model, settings,
                                                                                  fault, code):
    settings.LLM_RETRY_BASE_DELAY = 0.01
    fake_upstream.configure("w", tokens=20, **fault)
    with pytest.raises(LLMError) as info:
        await service.complete(ChatRequest(model=model.name, messages=MESSAGES))
    assert info.value.code == code and info.value.partial is None  # no text arrived: nothing to bill as partial

    fake_upstream.reset()  # fail_times counts from the first request
    fake_upstream.configure("w", tokens=20, fail_times=1, **fault)
    result = await service.complete(ChatRequest(model=model.name, messages=MESSAGES))
    assert [a.ok for a in result.attempts][-2:] == [False, True] and result.usage.completion_tokens == 20


async def test_an_upstream_error_status_on_a_whole_reply_is_the_sdks_error(fake_upstream):
    fake_upstream.configure("w", status=429, retry_after=2)
    adapter = OpenAICompatibleProvider(base_url=fake_upstream.base_url, api_key="sk-test")
    try:
        with pytest.raises(LLMError) as info:
            async for _ in adapter.complete(ChatRequest(model="x", messages=MESSAGES), "w"):
                pass
    finally:
        await adapter.client.close()
    assert info.value.code == "rate_limited" and info.value.retry_after == 2
