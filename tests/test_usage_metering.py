"""The metered call path: hold, record, exact charge, cut-offs, failures, debug runs."""

from decimal import Decimal

import pytest

from agents.llm import tokens
from agents.llm.types import ChatRequest, LLMError
from tests.factories import make_fake_model, make_model, make_user
from usage.billing.ledger import grant_credits
from usage.errors import InsufficientBalance
from usage.metering import CallContext, MeteredResult, metered_complete, metered_stream
from usage.models import CreditAccount, LedgerEntry, Reservation, UsageCounter, UsageRecord

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("close_thread_connections")]

MESSAGES = [{"role": "user", "content": "Write one line about the sea."}]


def _request(model, **kw) -> ChatRequest:
    return ChatRequest(model=model.name, messages=MESSAGES, **kw)


def _account(user) -> CreditAccount:
    return CreditAccount.objects.get(user=user)


async def _db(fn, *args, **kwargs):
    from asgiref.sync import sync_to_async

    return await sync_to_async(fn)(*args, **kwargs)


async def test_free_demo_call_is_recorded_and_needs_no_balance():
    user = await _db(make_user)
    model = await _db(make_model)  # demo provider, price 0
    metered = await metered_complete(CallContext(user=user, entry_point="chat"), _request(model))
    record = await _db(UsageRecord.objects.get)
    assert metered.record.pk == record.pk and metered.cost == 0 and record.cost == 0
    assert record.status == "success" and record.token_source == "measured" and record.completion_tokens > 0
    assert record.prompt_tokens == tokens.count_messages(MESSAGES, model.name)
    assert not await _db(CreditAccount.objects.filter(user=user).exists)
    counter = await _db(UsageCounter.objects.get, user=user)
    assert counter.tokens == record.total_tokens and counter.cost == 0


async def test_priced_call_charges_exact_cost_and_releases_the_hold(fake_upstream):
    user = await _db(make_user)
    model = await _db(make_fake_model, fake_upstream, "priced", input_price="2.5", output_price="10")
    fake_upstream.configure("priced", tokens=7)
    await _db(grant_credits, user=user, amount=Decimal("1"), reason="t", created_by=None)
    metered = await metered_complete(CallContext(user=user, entry_point="chat"), _request(model, max_tokens=50))
    prompt = tokens.count_messages(MESSAGES)
    expected = (Decimal(prompt) * Decimal("2.5") + 7 * Decimal(10)) / Decimal(1_000_000)
    assert metered.cost == expected and metered.record.completion_tokens == 7
    account = await _db(_account, user)
    assert account.balance == Decimal(1) - expected and account.reserved == 0
    charge = await _db(LedgerEntry.objects.get, kind="charge")
    assert charge.amount == -expected and charge.usage_record_id == metered.record.pk
    reservation = await _db(Reservation.objects.get)
    # The hold was the worst case: prompt + max_tokens at the model's price.
    assert reservation.status == "settled" and reservation.amount == (
        Decimal(prompt) * Decimal("2.5") + 50 * Decimal(10)) / Decimal(1_000_000)


async def test_short_balance_is_refused_before_any_model_call(fake_upstream):
    user = await _db(make_user)
    model = await _db(make_fake_model, fake_upstream, "dear", input_price="1", output_price="1")
    with pytest.raises(InsufficientBalance):
        await metered_complete(CallContext(user=user, entry_point="chat"), _request(model))
    assert fake_upstream.requests == [] and not await _db(UsageRecord.objects.exists)


async def test_cached_prompt_tokens_are_priced_at_the_cached_price(fake_upstream):
    user = await _db(make_user)
    model = await _db(make_fake_model, fake_upstream, "cachey", input_price="4", output_price="0",
                      cached_input_price="1")
    fake_upstream.configure("cachey", tokens=1, cached_tokens=10)
    await _db(grant_credits, user=user, amount=Decimal("1"), reason="t", created_by=None)
    metered = await metered_complete(CallContext(user=user, entry_point="openai"), _request(model, max_tokens=5))
    prompt = tokens.count_messages(MESSAGES)
    assert metered.record.cached_prompt_tokens == 10
    assert metered.cost == (Decimal(prompt - 10) * 4 + Decimal(10) * 1) / Decimal(1_000_000)


async def test_stream_closed_by_caller_bills_prompt_plus_delivered_text(fake_upstream):
    user = await _db(make_user)
    model = await _db(make_fake_model, fake_upstream, "cutme", input_price="1", output_price="1")
    fake_upstream.configure("cutme", tokens=200, chunk_delay=0.01)
    await _db(grant_credits, user=user, amount=Decimal("1"), reason="t", created_by=None)
    stream = metered_stream(CallContext(user=user, entry_point="ws"), _request(model, max_tokens=300))
    delivered = []
    async for item in stream:
        delivered.append(item.content)
        if len(delivered) == 3:
            break
    await stream.aclose()
    record = await _db(UsageRecord.objects.get)
    assert record.status == "cancelled" and record.token_source == "partial" and record.charged
    assert record.completion_tokens == tokens.count_text("".join(delivered)) > 0
    assert record.prompt_tokens == tokens.count_messages(MESSAGES)
    account = await _db(_account, user)
    assert account.reserved == 0 and account.balance == Decimal(1) - record.cost


async def test_upstream_error_before_text_is_recorded_not_charged(fake_upstream):
    user = await _db(make_user)
    model = await _db(make_fake_model, fake_upstream, "broken", input_price="1", output_price="1")
    fake_upstream.configure("broken", status=400)
    await _db(grant_credits, user=user, amount=Decimal("1"), reason="t", created_by=None)
    with pytest.raises(Exception) as info:  # noqa: B017 - LLMError once the service layer maps upstream errors
        await metered_complete(CallContext(user=user, entry_point="chat"), _request(model))
    record = await _db(UsageRecord.objects.get)
    assert record.status == "error" and not record.charged and record.completion_tokens == 0
    if isinstance(info.value, LLMError):
        assert info.value.usage_record.pk == record.pk
    account = await _db(_account, user)
    assert account.balance == 1 and account.reserved == 0
    assert await _db(lambda: Reservation.objects.get().status) == "released"


async def test_debug_run_is_recorded_with_cost_but_never_charged_nor_counted(fake_upstream):
    user = await _db(make_user, staff=True)
    model = await _db(make_fake_model, fake_upstream, "dbg", input_price="3", output_price="6")
    fake_upstream.configure("dbg", tokens=5)
    metered = await metered_complete(CallContext(user=user, entry_point="debug", debug=True), _request(model))
    assert metered.record.debug and metered.cost > 0 and not metered.record.charged
    assert not await _db(LedgerEntry.objects.exists)
    assert not await _db(UsageCounter.objects.exists)


async def test_stream_yields_deltas_then_one_metered_result():
    user = await _db(make_user)
    model = await _db(make_model)
    items = [item async for item in metered_stream(CallContext(user=user, entry_point="chat"), _request(model))]
    assert all(not isinstance(i, MeteredResult) for i in items[:-1]) and isinstance(items[-1], MeteredResult)
    assert "".join(i.content for i in items[:-1]) == items[-1].result.content


async def test_upstream_cut_after_delivered_text_bills_the_delivered_part(fake_upstream):
    user = await _db(make_user)
    model = await _db(make_fake_model, fake_upstream, "dropper", input_price="1", output_price="1")
    fake_upstream.configure("dropper", tokens=50, cut_after=4)
    await _db(grant_credits, user=user, amount=Decimal("1"), reason="t", created_by=None)
    delivered = []
    with pytest.raises(LLMError) as info:
        async for item in metered_stream(CallContext(user=user, entry_point="chat"), _request(model)):
            delivered.append(item.content)
    record = info.value.usage_record
    assert record.status == "error" and record.token_source == "partial" and record.charged
    assert record.completion_tokens == tokens.count_text("".join(delivered)) > 0  # never the error text
    account = await _db(_account, user)
    assert account.balance == Decimal(1) - record.cost and account.reserved == 0


async def test_drain_policy_bills_the_upstreams_final_usage(fake_upstream, settings):
    settings.CUTOFF_BILLING_POLICY = "drain"
    user = await _db(make_user)
    model = await _db(make_fake_model, fake_upstream, "drainer", input_price="1", output_price="1")
    fake_upstream.configure("drainer", tokens=30)
    await _db(grant_credits, user=user, amount=Decimal("1"), reason="t", created_by=None)
    stream = metered_stream(CallContext(user=user, entry_point="ws"), _request(model, max_tokens=100))
    async for _ in stream:
        break
    await stream.aclose()
    record = await _db(UsageRecord.objects.get)
    assert record.status == "cancelled" and record.token_source == "partial" and record.completion_tokens == 30
    assert fake_upstream.completions == 1


async def test_cancelled_task_is_recorded_and_billed_for_what_was_delivered(fake_upstream):
    import asyncio

    user = await _db(make_user)
    model = await _db(make_fake_model, fake_upstream, "slowpoke", input_price="1", output_price="1")
    fake_upstream.configure("slowpoke", tokens=100, chunk_delay=0.05)
    await _db(grant_credits, user=user, amount=Decimal("1"), reason="t", created_by=None)
    delivered = []
    got_some = asyncio.Event()

    async def consume():
        async for item in metered_stream(CallContext(user=user, entry_point="ws"), _request(model, max_tokens=200)):
            delivered.append(item.content)
            if len(delivered) == 2:
                got_some.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(got_some.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    record = await _db(UsageRecord.objects.get)
    assert record.status == "cancelled" and record.token_source == "partial" and record.charged
    assert record.completion_tokens == tokens.count_text("".join(delivered))
    assert (await _db(_account, user)).reserved == 0


async def test_response_cache_hit_costs_nothing(fake_upstream):
    user = await _db(make_user)
    model = await _db(make_fake_model, fake_upstream, "cacheable", input_price="1", output_price="1")
    await _db(grant_credits, user=user, amount=Decimal("1"), reason="t", created_by=None)
    ctx = CallContext(user=user, entry_point="openai")
    first = await metered_complete(ctx, _request(model, temperature=0, max_tokens=20))
    second = await metered_complete(ctx, _request(model, temperature=0, max_tokens=20))
    assert first.cost > 0 and second.result.cache_hit and second.cost == 0 and second.record.cached
    assert not second.record.charged and fake_upstream.completions == 1
    account = await _db(_account, user)
    assert account.balance == Decimal(1) - first.cost


async def test_drain_policy_stops_at_its_cap_and_bills_what_was_read(fake_upstream, settings):
    settings.CUTOFF_BILLING_POLICY = "drain"
    settings.CUTOFF_DRAIN_MAX_SECONDS = 0.3
    user = await _db(make_user)
    model = await _db(make_fake_model, fake_upstream, "endless", input_price="1", output_price="1")
    fake_upstream.configure("endless", tokens=400, chunk_delay=0.02)  # ~8 s of output: far past the cap
    await _db(grant_credits, user=user, amount=Decimal("1"), reason="t", created_by=None)
    stream = metered_stream(CallContext(user=user, entry_point="ws"), _request(model, max_tokens=500))
    shown = []
    async for item in stream:
        shown.append(item.content)
        break
    await stream.aclose()
    record = await _db(UsageRecord.objects.get)
    # Read on for the cap only: more than was shown (generated and paid upstream), far less than the whole reply.
    assert record.status == "cancelled" and record.token_source == "partial" and record.charged
    assert tokens.count_text("".join(shown)) < record.completion_tokens < 400
    account = await _db(_account, user)
    assert account.balance == Decimal(1) - record.cost and account.reserved == 0


async def test_no_usage_from_the_upstream_is_billed_as_estimated(fake_upstream):
    user = await _db(make_user)
    model = await _db(make_fake_model, fake_upstream, "silent", input_price="2", output_price="3")
    fake_upstream.configure("silent", tokens=6, omit_usage=True)
    await _db(grant_credits, user=user, amount=Decimal("1"), reason="t", created_by=None)
    metered = await metered_complete(CallContext(user=user, entry_point="openai"), _request(model, max_tokens=20))
    record = metered.record
    assert record.token_source == "estimated" and record.estimated and record.charged
    assert record.completion_tokens == tokens.count_text(metered.result.content) > 0
    assert record.prompt_tokens == tokens.count_messages(MESSAGES)
    assert record.cost == (Decimal(record.prompt_tokens) * 2 + Decimal(record.completion_tokens) * 3) / 1_000_000
    assert (await _db(_account, user)).balance == Decimal(1) - record.cost
