"""Fixtures for the usage tests (loaded from tests/conftest.py)."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.conf import settings


def ledger_mismatches() -> list[tuple[int, Decimal, Decimal]]:
    """Accounts whose balance is not the sum of their ledger: (account id, balance, ledger sum)."""
    from usage.models import CreditAccount, LedgerEntry

    sums: dict[int, Decimal] = {}
    for account_id, amount in LedgerEntry.objects.values_list("account_id", "amount"):
        sums[account_id] = sums.get(account_id, Decimal(0)) + amount
    # SQLite keeps decimals as floats; PostgreSQL must agree to the last place.
    tolerance = Decimal(0) if settings.IS_POSTGRES else Decimal("1e-6")
    return [(pk, bal, sums.get(pk, Decimal(0))) for pk, bal in CreditAccount.objects.values_list("id", "balance")
            if abs(bal - sums.get(pk, Decimal(0))) > tolerance]


@pytest.fixture(autouse=True)
def _fresh_price_cache():
    """Prices are cached per process for a few seconds; a test never sees another test's (rolled back) prices."""
    from usage import pricing

    pricing.clear_cache()
    yield


@pytest.fixture(autouse=True)
def _ledger_sums_to_balance(request):
    """After every test that touched the database: each balance equals the sum of its ledger."""
    marker = request.node.get_closest_marker("django_db")
    if marker is None:
        yield
        return
    request.getfixturevalue("_django_db_helper")  # set the database up first, so it is still there at teardown
    yield
    assert ledger_mismatches() == []


@pytest.fixture
def funded_user():
    """A user and a function topping their balance up: `user, topup = funded_user; topup("10")`."""
    from tests.factories import make_user
    from usage.billing.ledger import grant_credits

    user = make_user()

    def topup(amount: str) -> None:
        grant_credits(user=user, amount=Decimal(amount), reason="test top-up", created_by=None)

    return user, topup


def simulate_call(user, *, model: str = "", prompt: int = 0, completion: int = 0, cached: int = 0, now=None,
                  project: str = "", max_tokens: int | None = None, api_key=None, debug: bool = False,
                  messages: list | None = None, status: str = "success", billable: bool = True):
    """A metered call without an upstream: the real hold (begin_call) and record (record_call) with given tokens.

    For tests of money, quotas and stats that need exact token counts; the upstream path is tested separately.
    """
    from agents.llm.types import ChatRequest
    from usage.billing.calls import CallOutcome, call_meta
    from usage.billing.counters import deliver_alerts
    from usage.billing.holds import begin_call
    from usage.billing.recording import record_call
    from usage.metering import CallContext

    ctx = CallContext(user=user, entry_point="chat", project=project, api_key=api_key, debug=debug, now=now)
    request = ChatRequest(model=model, messages=messages or [], max_tokens=max_tokens or completion or 1)
    plan = begin_call(ctx=ctx, request=request, now=now)
    outcome = CallOutcome(status=status, model=model, provider="test", prompt_tokens=prompt,
                          cached_prompt_tokens=cached, completion_tokens=completion, billable=billable)
    record, alerts = record_call(meta=call_meta(ctx), plan=plan, outcome=outcome)
    deliver_alerts(alerts)
    return record


class BillingReceiver:
    """A real HTTP billing backend on loopback (aiohttp in a thread) that deduplicates by Idempotency-Key."""

    def __init__(self) -> None:
        import threading

        self.received: list[tuple[str, list[int]]] = []  # every POST: (key, record ids)
        self.raw: list[tuple[dict[str, str], bytes]] = []  # every POST: (headers, body), for webhooks
        self.accepted: dict[str, list[int]] = {}  # first POST per key
        self.fail_next = 0  # answer 500 to this many POSTs
        self.on_batch = None  # called with (n-th POST, key) before answering
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        import asyncio
        import json

        from aiohttp import web

        async def handle(request):
            raw = await request.read()
            self.raw.append((dict(request.headers), raw))
            body = json.loads(raw)
            if "records" not in body:  # a webhook, not a billing batch
                return web.json_response({"ok": True})
            key = request.headers["Idempotency-Key"]
            self.received.append((key, [r["id"] for r in body["records"]]))
            if self.on_batch:
                self.on_batch(len(self.received), key)
            if self.fail_next:
                self.fail_next -= 1
                return web.json_response({"error": "try later"}, status=500)
            self.accepted.setdefault(key, [r["id"] for r in body["records"]])
            return web.json_response({"ok": True})

        async def main():
            app = web.Application()
            app.router.add_post("/usage", handle)
            self._runner = web.AppRunner(app)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]
            self._stop = asyncio.Event()
            self._ready.set()
            await self._stop.wait()
            await self._runner.cleanup()

        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(main())

    def start(self) -> BillingReceiver:
        self._thread.start()
        assert self._ready.wait(5)
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(5)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/usage"

    def accepted_ids(self) -> list[int]:
        return sorted(i for ids in self.accepted.values() for i in ids)


@pytest.fixture
def billing_receiver():
    receiver = BillingReceiver().start()
    yield receiver
    receiver.stop()


@pytest.fixture
async def close_thread_connections():
    """Async tests: close the connection the sync_to_async worker thread opened, so the test DB can be dropped."""
    yield
    from asgiref.sync import sync_to_async
    from django.db import connections

    await sync_to_async(connections.close_all)()
