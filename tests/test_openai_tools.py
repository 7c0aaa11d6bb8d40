"""Function calling on /v1: `tools`, `tool_choice`, `parallel_tool_calls` and `response_format` pass through to an
OpenAI-compatible upstream, streamed and not; tool calls come back in OpenAI's shape (finish_reason "tool_calls"),
the round trip with a `tool` message works, and the call is metered on the upstream's usage. The demo provider
refuses tools with 400 unsupported_parameter. Driven by the real openai SDK (ASGI app in process) against
devtools/fake_openai.py."""

from __future__ import annotations

import json
from decimal import Decimal

import httpx2
import openai
import pytest
from asgiref.sync import sync_to_async
from django.core.asgi import get_asgi_application

from devtools.fake_openai import _ENCODING
from tests.factories import make_model, make_provider
from tests.fixtures_openai import FAKE_GPT_INPUT_PRICE, FAKE_GPT_OUTPUT_PRICE
from usage.models import CreditAccount, UsageRecord

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("close_thread_connections")]

MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
]
ARGUMENTS = json.dumps({"echo": "Weather in Paris?"})


@pytest.fixture
async def sdk():
    clients = []

    def make(raw_key: str) -> openai.AsyncOpenAI:
        transport = httpx2.ASGITransport(app=get_asgi_application())  # type: ignore[arg-type]
        clients.append(openai.AsyncOpenAI(base_url="http://testserver/v1", api_key=raw_key, max_retries=0,
                                          http_client=httpx2.AsyncClient(transport=transport)))
        return clients[-1]

    yield make
    for client in clients:
        await client.close()


async def _records(user) -> list[UsageRecord]:
    return await sync_to_async(lambda: list(UsageRecord.objects.filter(user=user).order_by("id")))()


async def test_tools_pass_through_and_tool_calls_come_back(openai_account, fake_gpt, fake_upstream, sdk):
    client = sdk(openai_account.raw)
    reply = await client.chat.completions.create(
        model="fake-gpt", messages=MESSAGES, tools=TOOLS, tool_choice="auto", parallel_tool_calls=False,
        response_format={"type": "text"})
    sent = fake_upstream.requests[-1]["body"]
    assert sent["tools"] == TOOLS and sent["tool_choice"] == "auto" and sent["parallel_tool_calls"] is False
    assert sent["response_format"] == {"type": "text"}
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.function.arguments == ARGUMENTS
    assert call.id.startswith("call_fake")

    # Metered on the upstream's usage, charged at the model's price.
    completion = len(_ENCODING.encode_ordinary(ARGUMENTS))
    assert reply.usage.completion_tokens == completion
    [record] = await _records(openai_account.user)
    assert record.completion_tokens == completion and record.prompt_tokens == reply.usage.prompt_tokens
    expected = (Decimal(record.prompt_tokens) * Decimal(FAKE_GPT_INPUT_PRICE)
                + Decimal(completion) * Decimal(FAKE_GPT_OUTPUT_PRICE)) / Decimal(1_000_000)
    assert record.cost == expected
    balance = await sync_to_async(lambda: CreditAccount.objects.get(user=openai_account.user).balance)()
    assert balance == Decimal("100") - expected


async def test_streamed_tool_calls_arrive_as_deltas(openai_account, fake_gpt, fake_upstream, sdk):
    client = sdk(openai_account.raw)
    stream = await client.chat.completions.create(
        model="fake-gpt", messages=MESSAGES, tools=TOOLS, stream=True, stream_options={"include_usage": True},
        tool_choice={"type": "function", "function": {"name": "get_time"}})
    chunks = [chunk async for chunk in stream]
    assert fake_upstream.requests[-1]["body"]["tool_choice"] == {"type": "function", "function": {"name": "get_time"}}
    pieces = [call for c in chunks if c.choices and c.choices[0].delta.tool_calls
              for call in c.choices[0].delta.tool_calls]
    assert pieces[0].id.startswith("call_fake") and pieces[0].function.name == "get_time"
    assert {p.index for p in pieces} == {0}
    assert "".join(p.function.arguments or "" for p in pieces) == ARGUMENTS
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["tool_calls"]
    assert chunks[-1].usage.completion_tokens == len(_ENCODING.encode_ordinary(ARGUMENTS))
    [record] = await _records(openai_account.user)
    assert record.completion_tokens == chunks[-1].usage.completion_tokens and record.cost > 0


async def test_the_round_trip_with_a_tool_result(openai_account, fake_gpt, fake_upstream, sdk):
    client = sdk(openai_account.raw)
    first = await client.chat.completions.create(model="fake-gpt", messages=MESSAGES, tools=TOOLS)
    call = first.choices[0].message.tool_calls[0]
    history = [*MESSAGES, first.choices[0].message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "18°C, sunny"}]
    second = await client.chat.completions.create(model="fake-gpt", messages=history, tools=TOOLS)
    assert second.choices[0].message.content == "Echo. Tool: 18°C, sunny"
    assert second.choices[0].finish_reason == "stop"
    sent = fake_upstream.requests[-1]["body"]["messages"]
    assert sent[1]["tool_calls"][0]["id"] == call.id and sent[1]["content"] is None
    assert sent[2] == {"role": "tool", "tool_call_id": call.id, "content": "18°C, sunny"}


async def test_the_demo_provider_refuses_tools_clearly(openai_account, fake_upstream, sdk):
    await sync_to_async(make_model)("demo-chat", provider=await sync_to_async(make_provider)(kind="demo"))
    client = sdk(openai_account.raw)
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model="demo-chat", messages=MESSAGES, tools=TOOLS)
    assert info.value.code == "unsupported_parameter" and "tools" in info.value.message
    balance = await sync_to_async(lambda: CreditAccount.objects.get(user=openai_account.user).balance)()
    assert balance == Decimal("100")  # nothing charged
    plain = await client.chat.completions.create(model="demo-chat", messages=MESSAGES)
    assert plain.choices[0].message.content


@pytest.mark.parametrize(("body", "param"), [
    ({"tools": [{"type": "function"}]}, "tools[0]"),
    ({"tools": "get_weather"}, "tools"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "c"}]}]},
     "messages[0].tool_calls[0]"),
])
async def test_malformed_tool_fields_are_400_naming_the_param(openai_account, fake_gpt, fake_upstream, sdk, body,
                                                              param):
    client = sdk(openai_account.raw)
    request = {"model": "fake-gpt", "messages": MESSAGES, **body}
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(**request)
    assert info.value.param == param
    assert fake_upstream.requests == []
