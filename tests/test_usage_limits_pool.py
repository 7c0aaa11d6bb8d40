"""The quota and key-budget check before a call on the async pool (usage.hotpath): one read, no thread hop.

A cold quota cache (a project not seen before), an account with quota limits and a key with a monthly budget
used to read through sync_to_async; now their rows come in one statement on the pool. The decisions are the
sync path's (holds.begin_call): the same refusals, and a refused call holds nothing.
"""

from decimal import Decimal
from typing import cast

import pytest
from asgiref.sync import sync_to_async
from django.utils import timezone

from agents.llm.types import ChatRequest
from aiwriter import dbpool
from tests.factories import make_api_key, make_model, make_user
from usage import hotpath, periods
from usage.billing import holds
from usage.billing.ledger import grant_credits
from usage.errors import KeyBudgetExceeded, QuotaExceeded
from usage.metering import CallContext
from usage.models import ApiKey, ApiKeyCounter, Quota, Reservation, UsageCounter

pytestmark = [pytest.mark.pg, pytest.mark.django_db(transaction=True),
              pytest.mark.usefixtures("close_thread_connections")]

MESSAGES = [{"role": "user", "content": "hi"}]


def _user_with(*, account_tokens: int = 0, project_tokens: int = 0, used: int = 0, budget: str = "",
               spent: str = "") -> tuple:
    user = make_user()
    grant_credits(user=user, amount=Decimal("1"), reason="t", created_by=None)
    key = cast(ApiKey, make_api_key(user, project="blog")[0])
    period = periods.month_start(timezone.now())
    if account_tokens:
        Quota.objects.create(user=user, monthly_token_limit=account_tokens)
    if project_tokens:
        Quota.objects.create(user=user, project="blog", monthly_token_limit=project_tokens)
    if used:
        UsageCounter.objects.create(user=user, project="blog", period=period, tokens=used, cost=0)
        UsageCounter.objects.create(user=user, project="", period=period, tokens=used, cost=0)
    if budget:
        ApiKey.objects.filter(pk=key.pk).update(monthly_budget=Decimal(budget))
        key.refresh_from_db()
    if spent:
        ApiKeyCounter.objects.create(api_key=key, period=period, tokens=1, cost=Decimal(spent))
    holds.clear_limits_cache()
    return user, key


async def _begin(user, key, model):
    ctx = CallContext(user=user, entry_point="openai", api_key=key, project="blog")
    return await hotpath.begin_call(ctx=ctx, request=ChatRequest(model=model.name, messages=MESSAGES, max_tokens=5))


async def _sync_begin(user, key, model):
    ctx = CallContext(user=user, entry_point="openai", api_key=key, project="blog")
    return await sync_to_async(holds.begin_call)(
        ctx=ctx, request=ChatRequest(model=model.name, messages=MESSAGES, max_tokens=5))


@pytest.mark.parametrize("setup, error", [
    (dict(account_tokens=100, used=100), QuotaExceeded),
    (dict(project_tokens=50, used=60), QuotaExceeded),
    (dict(budget="1", spent="1"), KeyBudgetExceeded),
    (dict(account_tokens=1000, used=10, budget="5", spent="1"), None),
    ({}, None),
])
async def test_the_pool_check_decides_as_the_sync_path(setup, error):
    model = await sync_to_async(make_model)(input_price="1000", output_price="1000")
    for begin in (_sync_begin, _begin):
        user, key = await sync_to_async(_user_with)(**setup)
        if error is None:
            plan = await begin(user, key, model)
            assert plan.reservation_id is not None
        else:
            with pytest.raises(error):
                await begin(user, key, model)
            assert not await sync_to_async(Reservation.objects.filter(account__user=user).exists)()


async def test_cold_limits_and_counters_are_one_read_on_the_pool_then_cached():
    model = await sync_to_async(make_model)(input_price="1000", output_price="1000")
    user, key = await sync_to_async(_user_with)(project_tokens=10**6, used=5)
    pool = await dbpool.get_pool()
    before = pool.get_stats().get("requests_num", 0)
    await _begin(user, key, model)
    assert pool.get_stats().get("requests_num", 0) - before == 2  # limits with counters, then the hold
    assert holds.cached_limits(user.pk, "blog").scopes == {"": (0, Decimal("0")), "blog": (10**6, Decimal("0"))}


async def test_an_account_without_limits_reads_nothing_once_cached():
    model = await sync_to_async(make_model)(input_price="1000", output_price="1000")
    user, key = await sync_to_async(_user_with)()
    await _begin(user, key, model)
    pool = await dbpool.get_pool()
    before = pool.get_stats().get("requests_num", 0)
    await _begin(user, key, model)
    assert pool.get_stats().get("requests_num", 0) - before == 1  # the hold alone
