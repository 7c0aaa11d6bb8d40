"""The hot path on the async pool (usage.hotpath over aiwriter.dbpool) writes exactly what the sync path writes.

Same call, two users with the same credit, key and quota state: one through the sync services (the ORM
connection, as on SQLite), one through the async pool. The record's fields, the ledger entry, the account,
the hold, the counters, the key counter and the daily rollup must match row for row. And a metered call on
PostgreSQL really runs its hold and record on the pool (no thread hop for them).
"""

from decimal import Decimal

import pytest
from asgiref.sync import sync_to_async
from django.db import connection

from agents.llm.types import ChatRequest
from aiwriter import dbpool
from tests.factories import make_api_key, make_fake_model, make_model, make_user
from usage import hotpath
from usage.billing import holds, recording
from usage.billing.calls import CallOutcome, call_meta
from usage.billing.ledger import grant_credits
from usage.errors import InsufficientBalance
from usage.metering import CallContext, metered_complete
from usage.models import (
    ApiKeyCounter,
    CreditAccount,
    DailyRollup,
    LedgerEntry,
    Reservation,
    UsageCounter,
    UsageRecord,
)

pytestmark = [pytest.mark.pg, pytest.mark.django_db(transaction=True),
              pytest.mark.usefixtures("close_thread_connections")]

MESSAGES = [{"role": "user", "content": "Write one line about the sea."}]
RECORD_FIELDS = [f.attname for f in UsageRecord._meta.concrete_fields
                 if f.attname not in ("id", "user_id", "api_key_id", "created_at")]


def _setup(credit: str = "1"):
    user = make_user()
    grant_credits(user=user, amount=Decimal(credit), reason="t", created_by=None)
    key, _ = make_api_key(user, project="blog")
    return user, key


def _rows(user) -> dict:
    """Everything a call writes for this user, without ids that differ between users."""
    record = UsageRecord.objects.get(user=user)
    account = CreditAccount.objects.get(user=user)
    reservation = Reservation.objects.get(account=account)
    context = {k: v for k, v in reservation.context.items() if k not in ("user_id", "api_key_id", "started_at")}
    return {
        "record": {f: getattr(record, f) for f in RECORD_FIELDS},
        "ledger": list(LedgerEntry.objects.filter(account=account).order_by("id")
                       .values_list("amount", "kind", "reason", "balance_after")),
        "ledger_links_record": LedgerEntry.objects.filter(account=account, kind="charge").get().usage_record_id
        == record.pk,
        "account": (account.balance, account.reserved),
        "reservation": (reservation.amount, reservation.status, reservation.usage_record_id == record.pk, context),
        "counters": sorted(UsageCounter.objects.filter(user=user).values_list("project", "period", "tokens", "cost")),
        "key_counter": list(ApiKeyCounter.objects.filter(api_key__user=user).values_list("period", "tokens", "cost")),
        "rollup": list(DailyRollup.objects.filter(user=user).values_list(
            "project", "agent_id", "provider", "model", "day", "calls", "errors", "cache_hits", "prompt_tokens",
            "completion_tokens", "total_tokens", "cost")),
    }


def _outcome(model) -> CallOutcome:
    return CallOutcome(status="success", model=model.name, provider="p", upstream_model="u", prompt_tokens=12,
                       cached_prompt_tokens=2, completion_tokens=30, latency_ms=40, ttft_ms=5,
                       metadata={"note": "x"})


async def test_both_paths_write_the_same_rows():
    model = await sync_to_async(make_model)(input_price="2.5", output_price="10")
    request = ChatRequest(model=model.name, messages=MESSAGES, max_tokens=50)
    sync_user, sync_key = await sync_to_async(_setup)()
    async_user, async_key = await sync_to_async(_setup)()

    sync_ctx = CallContext(user=sync_user, entry_point="openai", api_key=sync_key, project="blog")
    plan = await sync_to_async(holds.begin_call)(ctx=sync_ctx, request=request)
    await sync_to_async(recording.record_call)(meta=call_meta(sync_ctx), plan=plan, outcome=_outcome(model))

    async_ctx = CallContext(user=async_user, entry_point="openai", api_key=async_key, project="blog")
    pool = await dbpool.get_pool()
    before = pool.get_stats().get("requests_num", 0)
    plan = await hotpath.begin_call(ctx=async_ctx, request=request)
    record = await hotpath.record_call(meta=call_meta(async_ctx), plan=plan, outcome=_outcome(model))
    assert record is not None and record.pk
    # a cold quota cache's read (with the counters), the hold and the record: all on the pool
    assert pool.get_stats().get("requests_num", 0) - before == 3

    sync_rows, async_rows = await sync_to_async(_rows)(sync_user), await sync_to_async(_rows)(async_user)
    assert async_rows == sync_rows
    assert async_rows["reservation"][1] == "settled" and async_rows["account"][1] == 0
    assert async_rows["ledger_links_record"] and async_rows["key_counter"][0][2] > 0


async def test_charge_not_covered_rolls_back_and_takes_the_general_path():
    """The hold covers the worst case, but a price raised since (here: the record at a dearer outcome) may not be
    covered: the one statement aborts whole (nothing half-written) and the sync general path charges what is there."""
    model = await sync_to_async(make_model)(input_price="1000", output_price="1000")
    user, key = await sync_to_async(_setup)("0.05")
    ctx = CallContext(user=user, entry_point="openai", api_key=key, project="blog")
    plan = await hotpath.begin_call(ctx=ctx, request=ChatRequest(model=model.name, messages=MESSAGES, max_tokens=5))
    outcome = CallOutcome(status="success", model=model.name, prompt_tokens=100, completion_tokens=100)
    assert await hotpath.record_call(meta=call_meta(ctx), plan=plan, outcome=outcome) is None
    assert await sync_to_async(UsageRecord.objects.count)() == 0  # rolled back, even in autocommit
    record, _ = await sync_to_async(recording.record_call)(meta=call_meta(ctx), plan=plan, outcome=outcome)
    account = await sync_to_async(CreditAccount.objects.get)(user=user)
    assert account.balance == 0 and account.reserved == 0
    assert record.metadata.get("uncharged")


async def test_refused_hold_raises_like_the_sync_path():
    model = await sync_to_async(make_model)(input_price="1000", output_price="1000")
    user, key = await sync_to_async(_setup)("0.000001")
    ctx = CallContext(user=user, entry_point="openai", api_key=key, project="blog")
    with pytest.raises(InsufficientBalance):
        await hotpath.begin_call(ctx=ctx, request=ChatRequest(model=model.name, messages=MESSAGES, max_tokens=50))
    assert await sync_to_async(Reservation.objects.count)() == 0


async def test_metered_call_holds_and_records_on_the_pool(fake_upstream):
    assert dbpool.enabled() and connection.vendor == "postgresql"
    user = await sync_to_async(make_user)()
    model = await sync_to_async(make_fake_model)(fake_upstream, "pooled", input_price="2.5", output_price="10")
    await sync_to_async(grant_credits)(user=user, amount=Decimal("1"), reason="t", created_by=None)
    ctx = CallContext(user=user, entry_point="chat")
    await metered_complete(ctx, ChatRequest(model=model.name, messages=MESSAGES, max_tokens=50))  # warms caches
    pool = await dbpool.get_pool()
    before = pool.get_stats().get("requests_num", 0)
    metered = await metered_complete(ctx, ChatRequest(model=model.name, messages=MESSAGES, max_tokens=50))
    assert pool.get_stats().get("requests_num", 0) - before == 2
    account = await sync_to_async(CreditAccount.objects.get)(user=user)
    assert account.reserved == 0 and account.balance == Decimal(1) - 2 * metered.cost
