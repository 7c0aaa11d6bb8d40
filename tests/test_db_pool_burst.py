"""The default PostgreSQL settings hold a burst (issue 12, item 10).

A live daphne with only DATABASE_URL set (as the README says for production) gets a bounded connection
pool: 200 concurrent /v1 calls wait for a connection instead of opening one each (PostgreSQL's
`max_connections` is 100 by default, and 100 of them got 503 `database_unavailable` before). Every call
gets an answer (success or 402), no 5xx; the process never holds more than DB_POOL_MAX +
DB_ASYNC_POOL_MAX connections (the sync pool and the hot path's async one); and the books are exact.
"""

from __future__ import annotations

import asyncio
import threading
import time
from decimal import Decimal

import aiohttp
import psycopg
import pytest
from django.db import connection
from django.db.models import Sum

from tests.fixtures_faults import unsettled
from tests.fixtures_openai import make_account
from usage.models import CreditAccount, LedgerEntry, UsageRecord

pytestmark = [pytest.mark.pg, pytest.mark.django_db(transaction=True), pytest.mark.timeout(300)]

CALLS = 200
POOL_MAX = 20 + 20  # DB_POOL_MAX's default + DB_ASYNC_POOL_MAX's


@pytest.fixture
def live_server_daphne_env() -> dict[str, str]:
    # unset: the defaults
    return {"DB_POOL": "", "DB_POOL_MAX": "", "DB_POOL_TIMEOUT": "", "DB_ASYNC_POOL": "", "DB_ASYNC_POOL_MAX": ""}


class _ConnectionWatch:
    """Samples how many connections other processes hold to the test database (peak), from a thread."""

    def __init__(self) -> None:
        params = connection.get_connection_params()
        self._conninfo = psycopg.conninfo.make_conninfo(**{k: v for k, v in params.items()
                                                          if k in ("dbname", "user", "password", "host", "port")})
        self._dbname = params["dbname"]
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with psycopg.connect(self._conninfo, autocommit=True) as conn:
            while not self._stop.is_set():
                row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> %s",
                                   (self._dbname, conn.info.backend_pid)).fetchone()
                self.peak = max(self.peak, row[0] if row else 0)
                time.sleep(0.02)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)


async def _burst(base_url: str, auth: str, failures: list[bytes]) -> list[int]:
    body = {"model": "fake-gpt", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 100}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        async def one() -> int:
            async with session.post(base_url + "/v1/chat/completions", json=body,
                                    headers={"Authorization": auth}) as response:
                text = await response.read()
                if response.status >= 500:
                    failures.append(text[:300])
                return response.status

        return list(await asyncio.gather(*(one() for _ in range(CALLS))))


def test_200_concurrent_v1_calls_on_the_default_settings_get_no_5xx_and_exact_books(
        live_server_daphne, fake_gpt, fake_upstream):
    fake_upstream.configure("fake-gpt", tokens=50, latency=0.2)
    # Credit for some of the calls' holds only, so the burst also meets 402s.
    account = make_account(credit="0.05")
    failures: list[bytes] = []
    with _ConnectionWatch() as watch:
        started = time.monotonic()
        statuses = asyncio.run(_burst(live_server_daphne, account.auth, failures))
        print(f"burst of {CALLS}: {time.monotonic() - started:.1f} s, {statuses.count(200)} successes")
    assert set(statuses) <= {200, 402}, (sorted(set(statuses)), failures[:3])
    successes = statuses.count(200)
    assert successes >= 1
    # The daphne process holds at most its pool; this test holds its own connection (one more).
    assert watch.peak <= POOL_MAX + 1, watch.peak

    records = UsageRecord.objects.filter(api_key=account.key, charged=True)
    assert records.count() == successes == len(fake_upstream.requests)
    cost = records.first().cost
    assert set(records.values_list("cost", flat=True)) == {cost}
    credit = CreditAccount.objects.get(user=account.user)
    assert credit.balance == Decimal("0.05") - successes * cost
    ledger = LedgerEntry.objects.filter(account__user=account.user).aggregate(total=Sum("amount"))["total"]
    assert ledger == credit.balance
    assert not any(unsettled().values()), unsettled()
