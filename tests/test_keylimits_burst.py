"""A burst of concurrent calls against one key's limits (issue 12, item 6).

TPM holds the prompt plus the maximum output at admission (settled to the real figure at the end), so
a burst can pass `tpm` by at most one call; RPM stays exact. Real PostgreSQL (usage records) and Redis
(the shared counters); AsyncClient runs the burst on one loop, the upstream answering slowly enough
that the calls overlap.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from asgiref.sync import sync_to_async
from django.db import connections
from django.db.models import Sum
from django.test import AsyncClient, Client

from conversations.models import Conversation
from tests.fixtures_openai import make_account, start_of_a_fresh_minute
from usage.models import UsageRecord

pytestmark = [pytest.mark.pg, pytest.mark.redis, pytest.mark.django_db(transaction=True),
              pytest.mark.usefixtures("close_thread_connections")]

MESSAGES = [{"role": "user", "content": "Hello there"}]
ONE_CALL = 9 + 50  # the prompt above, and the 50 completion tokens the fake upstream is set to give


async def _burst(account, count: int, **body) -> list[int]:
    client = AsyncClient()

    async def one() -> int:
        response = await client.post("/v1/chat/completions", {"model": "fake-gpt", "messages": MESSAGES, **body},
                                     content_type="application/json", headers={"Authorization": account.auth})
        return response.status_code

    return list(await asyncio.gather(*(one() for _ in range(count))))


async def _tokens_used(account) -> int:
    total = await UsageRecord.objects.filter(api_key=account.key).aaggregate(total=Sum("total_tokens"))
    return total["total"] or 0


async def test_a_burst_passes_tpm_by_at_most_one_call(fake_gpt, fake_upstream):
    fake_upstream.configure("fake-gpt", tokens=50, latency=0.3)
    account = await sync_to_async(make_account)(tpm=200)
    await sync_to_async(start_of_a_fresh_minute)(margin=20)
    statuses = await _burst(account, 40)
    assert set(statuses) <= {200, 429} and statuses.count(200) >= 1
    used = await _tokens_used(account)
    assert used <= 200 + ONE_CALL, (used, statuses.count(200))
    assert len(fake_upstream.requests) == statuses.count(200)


async def test_with_max_tokens_calls_run_side_by_side_within_tpm(fake_gpt, fake_upstream):
    # Each call holds 9 + 50 tokens: three fit in 200 at once; a fourth is let in on what is left (23, more
    # than its prompt) and is the one call that may pass the limit; then the minute is all held.
    fake_upstream.configure("fake-gpt", tokens=50, latency=0.3)
    account = await sync_to_async(make_account)(tpm=200)
    await sync_to_async(start_of_a_fresh_minute)(margin=20)
    statuses = await _burst(account, 20, max_tokens=50)
    assert statuses.count(200) == 4 and statuses.count(429) == 16
    assert await _tokens_used(account) == 4 * ONE_CALL <= 200 + ONE_CALL


async def test_rpm_stays_exact_under_a_burst(fake_gpt, fake_upstream):
    fake_upstream.configure("fake-gpt", latency=0.2)
    account = await sync_to_async(make_account)(rpm=7, tpm=100_000)
    await sync_to_async(start_of_a_fresh_minute)(margin=20)
    statuses = await _burst(account, 30)
    assert statuses.count(200) == 7 and statuses.count(429) == 23
    assert len(fake_upstream.requests) == 7


async def test_a_refused_call_gives_its_hold_back(fake_upstream):
    """A call metering refuses before the model (no credit: 402) uses no tokens of the minute."""
    from tests.factories import make_fake_model

    await sync_to_async(make_fake_model)(fake_upstream, "fake-gpt", input_price="2", output_price="8")
    broke = await sync_to_async(make_account)(credit=None, tpm=200)
    await sync_to_async(start_of_a_fresh_minute)(margin=20)
    for _ in range(3):
        assert await _burst(broke, 1) == [402]
    from usage import keylimits

    hold = await keylimits.acquire(broke.key, prompt_tokens=9, max_output_tokens=191)
    assert hold is not None and hold.tokens == 200  # the whole minute is still there


def test_rest_chat_messages_hold_their_tokens_too(chat_agent, fake_upstream):
    """Three messages at once (threads, as daphne runs sync views) on three conversations of one key."""
    fake_upstream.configure("chat-model", tokens=50, latency=0.3)
    account = make_account(tpm=100)
    start_of_a_fresh_minute(margin=20)
    headers = {"Authorization": account.auth}
    conversations = [Conversation.objects.create(owner=account.user, agent=chat_agent).pk for _ in range(3)]
    barrier = threading.Barrier(3)

    def send(cid: int) -> int:
        try:
            barrier.wait(10)
            return Client().post(f"/api/conversations/{cid}/messages/", {"content": "hi"},
                                 content_type="application/json", headers=headers).status_code
        finally:
            connections.close_all()

    with ThreadPoolExecutor(3) as pool:
        statuses = list(pool.map(send, conversations))
    assert set(statuses) <= {201, 429} and statuses.count(201) >= 1, statuses
    records = list(UsageRecord.objects.filter(api_key=account.key).values_list("total_tokens", flat=True))
    assert len(records) == statuses.count(201) == len(fake_upstream.requests)
    assert sum(records) <= 100 + max(records), (records, statuses)
