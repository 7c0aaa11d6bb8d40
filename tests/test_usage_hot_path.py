"""The metering hot path runs a small fixed number of queries (pinned here; chat and /v1 add theirs on top).

On PostgreSQL the hold is one statement and the record with its charge, ledger entry, counters and rollup
is one statement in one transaction (usage/billing/recording.py); other backends take the general path, a
statement per row. Quota rows are cached in process, so a warm call reads none.
"""

from decimal import Decimal

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from agents.llm.types import ChatRequest
from tests.factories import make_api_key, make_model, make_user
from usage.billing.calls import CallOutcome, call_meta
from usage.billing.holds import begin_call
from usage.billing.ledger import grant_credits
from usage.billing.recording import record_call
from usage.metering import CallContext
from usage.models import (
    ApiKey,
    ApiKeyCounter,
    CreditAccount,
    DailyRollup,
    LedgerEntry,
    Quota,
    Reservation,
    UsageCounter,
)

pytestmark = pytest.mark.django_db(transaction=True)

# Django captures each transaction's BEGIN and COMMIT too.
TXN = 2


def _pg() -> bool:
    return connection.vendor == "postgresql"


def _call(ctx, model, completion_tokens=10):
    request = ChatRequest(model=model.name, messages=[{"role": "user", "content": "hi"}], max_tokens=10)
    with CaptureQueriesContext(connection) as before:
        plan = begin_call(ctx=ctx, request=request)
    outcome = CallOutcome(status="success", model=model.name, provider="p", prompt_tokens=5,
                          completion_tokens=completion_tokens)
    with CaptureQueriesContext(connection) as after:
        record, _ = record_call(meta=call_meta(ctx), plan=plan, outcome=outcome)
    return len(before), len(after), record


def test_priced_call_queries():
    user = make_user()
    grant_credits(user=user, amount=Decimal("1"), reason="t", created_by=None)
    model = make_model(input_price="1", output_price="1")
    _call(CallContext(user=user, entry_point="chat"), model)  # warms the price and quota caches
    before, after, _ = _call(CallContext(user=user, entry_point="chat"), model)
    if _pg():
        # before: hold + reservation, one statement; after: everything, one statement in one transaction
        assert (before, after) == (1, 1 + TXN)
    else:
        # before: hold UPDATE, reservation INSERT; after: record INSERT, reservation UPDATE, account UPDATE,
        # ledger INSERT, counter upsert, rollup upsert
        assert (before, after) == (2 + TXN, 6 + TXN)


def test_with_quota_project_and_key_budget():
    user = make_user()
    grant_credits(user=user, amount=Decimal("1"), reason="t", created_by=None)
    model = make_model(input_price="1", output_price="1")
    Quota.objects.create(user=user, monthly_token_limit=10**9)
    key, _ = make_api_key(user)
    ApiKey.objects.filter(pk=key.pk).update(monthly_budget=Decimal("100"))
    key.refresh_from_db()
    ctx = CallContext(user=user, entry_point="openai", api_key=key, project="blog")
    _call(ctx, model)
    before, after, _ = _call(ctx, model)
    # before: + counters read, + key counter read
    if _pg():
        assert (before, after) == (3, 1 + TXN)
    else:
        # after: + project counter upsert, + key counter upsert
        assert (before, after) == (4 + TXN, 8 + TXN)


def test_free_model_needs_no_hold():
    user = make_user()
    model = make_model()
    ctx = CallContext(user=user, entry_point="chat")
    _call(ctx, model)
    before, after, _ = _call(ctx, model)
    # before: nothing (quota rows cached); after: record INSERT, counter upsert, rollup upsert
    assert (before, after) == (0, 1 + TXN if _pg() else 3 + TXN)


def test_the_rows_written_are_the_same_on_every_path():
    """What one call leaves: whichever path wrote it (one statement on PostgreSQL), every row is right."""
    user = make_user()
    grant_credits(user=user, amount=Decimal("10"), reason="t", created_by=None)
    model = make_model(input_price="1000", output_price="2000")  # per million: 5 in + 10 out = 0.025
    Quota.objects.create(user=user, project="blog", monthly_token_limit=10**6)
    key, _ = make_api_key(user)
    ctx = CallContext(user=user, entry_point="openai", api_key=key, project="blog")
    _, _, record = _call(ctx, model)
    record.refresh_from_db()
    assert (record.cost, record.charged, record.total_tokens, record.api_key_id) == (
        Decimal("0.025"), True, 15, key.pk)
    account = CreditAccount.objects.get(user=user)
    assert (account.balance, account.reserved) == (Decimal("9.975"), 0)
    reservation = Reservation.objects.get()
    assert (reservation.status, reservation.usage_record_id) == (Reservation.Status.SETTLED, record.pk)
    charge = LedgerEntry.objects.get(kind=LedgerEntry.Kind.CHARGE)
    assert (charge.amount, charge.balance_after, charge.usage_record_id) == (
        Decimal("-0.025"), Decimal("9.975"), record.pk)
    counters = dict(UsageCounter.objects.values_list("project", "tokens"))
    assert counters == {"": 15, "blog": 15}
    assert ApiKeyCounter.objects.get().cost == Decimal("0.025")
    rollup = DailyRollup.objects.get()
    assert (rollup.calls, rollup.total_tokens, rollup.cost, rollup.project) == (1, 15, Decimal("0.025"), "blog")


def test_a_cost_above_the_free_balance_takes_the_general_path():
    """The one-statement path only settles a charge covered in full; otherwise it rolls back and the general
    path charges what the balance allows (never below zero), with the rest noted on the record."""
    user = make_user()
    grant_credits(user=user, amount=Decimal("0.05"), reason="t", created_by=None)
    model = make_model(input_price="1000", output_price="1000")
    ctx = CallContext(user=user, entry_point="chat")
    # The hold covers at most 10 output tokens; the upstream then reports 1,000 (a cost of 1.005).
    _, _, record = _call(ctx, model, completion_tokens=1000)
    record.refresh_from_db()
    account = CreditAccount.objects.get(user=user)
    assert (account.balance, account.reserved) == (0, 0)
    assert record.charged and Decimal(record.metadata["uncharged"]) == Decimal("0.955")
    assert LedgerEntry.objects.filter(kind=LedgerEntry.Kind.CHARGE).get().amount == Decimal("-0.05")
    assert record.__class__.objects.count() == 1 and Reservation.objects.get().usage_record_id == record.pk


@pytest.mark.pg
def test_the_one_statement_is_parsed_once_by_psycopg():
    """psycopg caches a statement's parsing only up to 4 kB and 50 parameters: the record's statement (its
    largest form: hold, charge, project, key) stays within both, so later calls reuse the parsing."""
    from psycopg import _queries

    user = make_user()
    grant_credits(user=user, amount=Decimal("1"), reason="t", created_by=None)
    model = make_model(input_price="1", output_price="1")
    key, _ = make_api_key(user)
    ctx = CallContext(user=user, entry_point="openai", api_key=key, project="blog")
    _call(ctx, model)
    before = _queries._query2pg_client.cache_info()
    _call(ctx, model)
    after = _queries._query2pg_client.cache_info()
    assert after.misses == before.misses and after.hits > before.hits
