"""The /v1 hot path runs a fixed, small number of queries, whatever the user's usage history.

Counted end to end through the async stack (queries in sync_to_async threads included) from the
Server-Timing header's `db;desc="N queries"` (aiwriter/observability.py).
"""

from __future__ import annotations

import re

import pytest
from asgiref.sync import sync_to_async

from bench.data import insert_usage
from tests.fixtures_openai import make_account

pytestmark = pytest.mark.django_db(transaction=True)

BODY = {"model": "fake-gpt", "messages": [{"role": "user", "content": "Count my queries"}]}
# What benchmark 4 measures today (docs/BENCHMARKS.md); raise it only with a reason.
MAX_QUERIES = 14


async def _queries(async_client, auth: str) -> int:
    response = await async_client.post("/v1/chat/completions", BODY, content_type="application/json",
                                       headers={"Authorization": auth})
    assert response.status_code == 200, response.content
    return int(re.search(r'db;dur=[\d.]+;desc="(\d+) queries"', response["Server-Timing"]).group(1))


async def _steady(async_client, auth: str) -> int:
    await _queries(async_client, auth)  # first call warms the route and price caches
    return await _queries(async_client, auth)


async def test_query_count_is_small(async_client, fake_gpt, close_thread_connections):
    account = await sync_to_async(make_account)()
    assert await _steady(async_client, account.auth) <= MAX_QUERIES


@pytest.mark.pg
async def test_query_count_does_not_grow_with_history(async_client, fake_gpt, close_thread_connections):
    fresh = await sync_to_async(make_account)()
    veteran = await sync_to_async(make_account)()
    await sync_to_async(insert_usage)(user_id=veteran.user.pk, rows=5_000)
    assert await _steady(async_client, veteran.auth) == await _steady(async_client, fresh.auth)
