"""Whole replies through the metered path (the /v1 non-stream and writer endpoints) keep service.complete's
semantics: the agent's timeout counts in total, then the fallback model serves, and the record says so."""

from decimal import Decimal

import pytest
from asgiref.sync import sync_to_async

from agents.llm.agent_request import build_agent_request
from agents.llm.types import ChatRequest, UpstreamTimeout
from tests.factories import make_agent, make_fake_model, make_user
from usage.billing.ledger import grant_credits
from usage.metering import CallContext, metered_complete
from usage.models import CreditAccount, UsageRecord

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("close_thread_connections")]

MESSAGES = [{"role": "user", "content": "Tell me a fact"}]


@sync_to_async
def _setup(fake_upstream):
    user = make_user()
    grant_credits(user=user, amount=Decimal("1"), reason="t", created_by=None)
    primary = make_fake_model(fake_upstream, "primary", upstream_model="slow", input_price="1", output_price="1")
    backup = make_fake_model(fake_upstream, "backup", upstream_model="quick", input_price="2", output_price="2")
    return user, primary, backup


async def test_whole_reply_timeout_counts_in_total_and_moves_to_fallback(fake_upstream):
    user, primary, backup = await _setup(fake_upstream)
    fake_upstream.configure("slow", tokens=10, chunk_delay=0.1)  # first token at once, the whole reply ~1 s
    fake_upstream.configure("quick", tokens=6)
    request = ChatRequest(model=primary.name, messages=MESSAGES, timeout=0.3, fallback_model=backup.name)
    metered = await metered_complete(CallContext(user=user, entry_point="openai"), request)
    assert metered.result.fallback is True and metered.result.fallback_reason == "timeout"
    assert metered.result.model == "backup" and metered.result.usage.completion_tokens == 6
    record = metered.record
    assert record.fallback and record.metadata == {"fallback_reason": "timeout"} and record.model == "backup"
    assert record.status == "success" and record.completion_tokens == 6 and record.charged
    assert metered.cost == Decimal(2 * record.total_tokens) / 1_000_000  # the fallback's price
    assert await sync_to_async(UsageRecord.objects.count)() == 1
    account = await sync_to_async(CreditAccount.objects.get)(user=user)
    assert account.balance == Decimal(1) - metered.cost and account.reserved == 0


async def test_agent_timeout_seconds_bounds_the_whole_reply(fake_upstream):
    user, primary, backup = await _setup(fake_upstream)
    agent = await sync_to_async(make_agent)("facts", model=primary, fallback_model=backup, timeout_seconds=1)
    fake_upstream.configure("slow", tokens=12, chunk_delay=0.2)  # streams promptly, but ~2.2 s in total
    request = build_agent_request(agent, MESSAGES, user=user)
    assert request.timeout == 1.0 and request.fallback_model == "backup"
    metered = await metered_complete(CallContext(user=user, entry_point="writer", agent=agent), request)
    assert metered.result.fallback and metered.result.fallback_reason == "timeout"
    assert [(a.model, a.ok, a.error_code) for a in metered.result.attempts] == [
        ("primary", False, "upstream_timeout"), ("backup", True, "")]


async def test_whole_reply_timeout_without_fallback_is_recorded_not_charged(fake_upstream):
    user, primary, _ = await _setup(fake_upstream)
    fake_upstream.configure("slow", tokens=10, chunk_delay=0.1)
    with pytest.raises(UpstreamTimeout) as info:
        await metered_complete(CallContext(user=user, entry_point="openai"),
                               ChatRequest(model=primary.name, messages=MESSAGES, timeout=0.3))
    record = info.value.usage_record
    assert record.status == "error" and record.error_code == "upstream_timeout" and not record.charged
    account = await sync_to_async(CreditAccount.objects.get)(user=user)
    assert account.balance == 1 and account.reserved == 0


async def test_whole_reply_cut_midway_is_retried_and_billed_once(fake_upstream, settings):
    settings.LLM_RETRY_BASE_DELAY = 0.01
    user, primary, _ = await _setup(fake_upstream)
    fake_upstream.configure("slow", tokens=40, cut_after=10, fail_times=1)
    metered = await metered_complete(CallContext(user=user, entry_point="openai"),
                                     ChatRequest(model=primary.name, messages=MESSAGES))
    assert [a.ok for a in metered.result.attempts] == [False, True]
    assert metered.record.completion_tokens == 40 and metered.record.token_source == "measured"
    assert await sync_to_async(UsageRecord.objects.count)() == 1
