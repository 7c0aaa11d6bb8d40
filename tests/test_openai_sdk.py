"""/v1 driven by the real openai SDK (sync and async clients) against a live daphne and the fake upstream."""

from __future__ import annotations

import time
from decimal import Decimal

import openai
import pytest
from asgiref.sync import sync_to_async

from devtools.fake_openai import echo_text, prompt_tokens
from tests.factories import make_agent
from tests.fixtures_openai import FAKE_GPT_INPUT_PRICE, FAKE_GPT_OUTPUT_PRICE, make_account
from usage.models import CreditAccount, LedgerEntry, UsageRecord
from usage.money import money_str

pytestmark = [pytest.mark.pg, pytest.mark.django_db(transaction=True)]

MESSAGES = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hello there"}]


def sync_client(base: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=20)


def async_client(base: str, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=20)


def expected_cost(prompt: int, completion: int) -> Decimal:
    raw = prompt * Decimal(FAKE_GPT_INPUT_PRICE) + completion * Decimal(FAKE_GPT_OUTPUT_PRICE)
    return (raw / Decimal(1_000_000)).quantize(Decimal("1e-10"))


def wait_for_record(api_key, timeout: float = 10.0) -> UsageRecord:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = UsageRecord.objects.filter(api_key=api_key).first()
        if record is not None:
            return record
        time.sleep(0.05)
    raise AssertionError("no usage record was written")


def test_plain_completion(live_server_daphne, openai_account, fake_gpt, fake_upstream):
    reply = sync_client(live_server_daphne, openai_account.raw).chat.completions.create(
        model="fake-gpt", messages=MESSAGES)
    assert reply.choices[0].message.content == echo_text(MESSAGES)
    assert reply.choices[0].finish_reason == "stop" and reply.model == "fake-gpt"
    assert reply.usage.prompt_tokens == prompt_tokens(MESSAGES)
    assert fake_upstream.served["fake-gpt"] == 1


async def test_stream_deltas_join_to_the_upstream_text_and_end_with_usage(live_server_daphne, openai_account,
                                                                          fake_gpt, fake_upstream):
    fake_upstream.configure("fake-gpt", tokens=40)
    stream = await async_client(live_server_daphne, openai_account.raw).chat.completions.create(
        model="fake-gpt", messages=MESSAGES, stream=True, stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    upstream = fake_upstream.requests[0]
    assert upstream["stream"] is True
    assert text.startswith(echo_text(MESSAGES)) and text.endswith(" the")
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 40 and chunks[-1].usage.prompt_tokens == prompt_tokens(MESSAGES)
    record = await UsageRecord.objects.aget(api_key=openai_account.key)
    assert (record.status, record.token_source, record.entry_point) == ("success", "measured", "openai")
    assert (record.prompt_tokens, record.completion_tokens) == (prompt_tokens(MESSAGES), 40)
    assert record.cost == expected_cost(record.prompt_tokens, 40)
    assert (await LedgerEntry.objects.aget(usage_record=record)).amount == -record.cost


async def test_stream_chunks_are_not_buffered(live_server_daphne, openai_account, fake_gpt, fake_upstream):
    fake_upstream.configure("fake-gpt", tokens=6, chunk_delay=0.25)
    started = time.monotonic()
    stream = await async_client(live_server_daphne, openai_account.raw).chat.completions.create(
        model="fake-gpt", messages=MESSAGES, stream=True)
    arrivals = [time.monotonic() - started async for chunk in stream
                if chunk.choices and chunk.choices[0].delta.content]
    # Six tokens 0.25 s apart: the first must arrive long before the last (no buffering on the way).
    assert len(arrivals) == 6 and arrivals[-1] - arrivals[0] > 1.0


def test_agent_applies_its_system_prompt(live_server_daphne, openai_account, fake_gpt, fake_upstream):
    make_agent("copy-editor", model=fake_gpt, system_prompt="You edit copy for project {project}.")
    reply = sync_client(live_server_daphne, openai_account.raw).chat.completions.create(
        model="agent:copy-editor", messages=MESSAGES)
    sent = fake_upstream.requests[0]["body"]["messages"]
    assert sent[0] == {"role": "system", "content": "You edit copy for project ."}
    assert reply.choices[0].message.content == "Echo. System: You edit copy for project . | User: Hello there"


def test_bad_key_raises_authentication_error(live_server_daphne, fake_gpt, fake_upstream):
    with pytest.raises(openai.AuthenticationError) as info:
        sync_client(live_server_daphne, "aiw_wrong").chat.completions.create(model="fake-gpt", messages=MESSAGES)
    assert info.value.code == "invalid_api_key" and fake_upstream.requests == []


async def test_unknown_model_raises_not_found(live_server_daphne, openai_account, fake_upstream):
    with pytest.raises(openai.NotFoundError) as info:
        await async_client(live_server_daphne, openai_account.raw).chat.completions.create(
            model="gpt-nope", messages=MESSAGES)
    assert info.value.code == "model_not_found" and info.value.param == "model"


@pytest.mark.parametrize("stream", [False, True])
def test_exhausted_balance_is_402_before_any_upstream_call(live_server_daphne, fake_gpt, fake_upstream, stream):
    broke = make_account(credit=None)
    with pytest.raises(openai.APIStatusError) as info:
        sync_client(live_server_daphne, broke.raw).chat.completions.create(
            model="fake-gpt", messages=MESSAGES, stream=stream)
    assert info.value.status_code == 402
    assert info.value.code == "insufficient_balance" and info.value.type == "insufficient_quota"
    assert info.value.response.headers["x-should-retry"] == "false"
    assert fake_upstream.requests == []


def test_usage_record_and_ledger_entry_are_exact(live_server_daphne, openai_account, fake_gpt, fake_upstream):
    raw = sync_client(live_server_daphne, openai_account.raw).chat.completions.with_raw_response.create(
        model="fake-gpt", messages=MESSAGES)
    reply = raw.parse()
    record = UsageRecord.objects.get(api_key=openai_account.key)
    assert (record.user, record.entry_point, record.model, record.status) == (
        openai_account.user, "openai", "fake-gpt", "success")
    assert (record.prompt_tokens, record.completion_tokens, record.token_source) == (
        reply.usage.prompt_tokens, reply.usage.completion_tokens, "measured")
    assert record.cost == expected_cost(reply.usage.prompt_tokens, reply.usage.completion_tokens) > 0
    assert raw.headers["x-aiwriter-cost"] == money_str(record.cost)
    assert raw.headers["x-aiwriter-provider"] == record.provider
    entry = LedgerEntry.objects.get(usage_record=record)
    assert entry.kind == LedgerEntry.Kind.CHARGE and entry.amount == -record.cost
    assert entry.balance_after == Decimal("100") - record.cost
    assert CreditAccount.objects.get(user=openai_account.user).balance == Decimal("100") - record.cost


async def test_client_closing_a_stream_early_pays_only_for_what_was_generated(live_server_daphne, openai_account,
                                                                              fake_gpt, fake_upstream):
    fake_upstream.configure("fake-gpt", tokens=400, chunk_delay=0.02)
    stream = await async_client(live_server_daphne, openai_account.raw).chat.completions.create(
        model="fake-gpt", messages=MESSAGES, stream=True, stream_options={"include_usage": True})
    received = 0
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            received += 1
        if received == 5:
            break
    await stream.close()
    record = await sync_to_async(wait_for_record)(openai_account.key)
    assert (record.status, record.token_source, record.error_code) == ("cancelled", "partial", "client_closed")
    assert 5 <= record.completion_tokens < 200
    assert record.prompt_tokens == prompt_tokens(MESSAGES)
    assert record.cost == expected_cost(record.prompt_tokens, record.completion_tokens)
    entry = await LedgerEntry.objects.aget(usage_record=record)
    assert entry.amount == -record.cost
    assert fake_upstream.served["fake-gpt"] == 0  # the upstream stream was closed, not read to the end
