"""Charging under concurrency (PostgreSQL): never over the balance, never below zero, ledger = balance."""

import asyncio
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import pytest
from asgiref.sync import sync_to_async
from django.db import connection

from agents.llm.types import ChatRequest
from tests.factories import make_fake_model, make_model, make_user
from tests.fixtures_usage import ledger_mismatches, simulate_call
from usage.billing.ledger import grant_credits
from usage.errors import InsufficientBalance
from usage.metering import CallContext, metered_complete
from usage.models import CreditAccount, LedgerEntry, Reservation, UsageRecord

pytestmark = [pytest.mark.pg, pytest.mark.django_db(transaction=True),
              pytest.mark.usefixtures("close_thread_connections")]

CENT_A_TOKEN = "10000"  # per million: 0.01 per output token


def _charge_once(user, model_name: str) -> bool:
    try:
        simulate_call(user, model=model_name, completion=1, max_tokens=1)
        return True
    except InsufficientBalance:
        return False
    finally:
        connection.close()  # each worker thread has its own connection: give it back


def test_200_concurrent_charges_against_a_balance_for_100():
    user = make_user()
    model = make_model(input_price="0", output_price=CENT_A_TOKEN)
    grant_credits(user=user, amount=Decimal("1.00"), reason="t", created_by=None)
    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(lambda _: _charge_once(user, model.name), range(200)))
    account = CreditAccount.objects.get(user=user)
    assert results.count(True) == 100 and account.balance == 0 and account.reserved == 0
    assert LedgerEntry.objects.filter(kind="charge").count() == 100
    assert UsageRecord.objects.filter(charged=True).count() == 100
    assert not Reservation.objects.filter(status="held").exists()
    assert ledger_mismatches() == []


async def test_concurrent_metered_calls_through_the_upstream_stop_at_the_balance(fake_upstream):
    user = await sync_to_async(make_user)()
    model = await sync_to_async(make_fake_model)(fake_upstream, "cent", input_price="0", output_price=CENT_A_TOKEN)
    fake_upstream.configure("cent", tokens=1, latency=0.05)
    await sync_to_async(grant_credits)(user=user, amount=Decimal("0.10"), reason="t", created_by=None)

    async def one():
        try:
            await metered_complete(CallContext(user=user, entry_point="openai"),
                                   ChatRequest(model=model.name, messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=1))
            return True
        except InsufficientBalance:
            return False

    results = await asyncio.gather(*[one() for _ in range(30)])
    account = await sync_to_async(CreditAccount.objects.get)(user=user)
    assert results.count(True) == 10 and account.balance == 0 and account.reserved == 0
    assert fake_upstream.served["cent"] == 10  # refused calls never reached the model


def test_ledger_is_append_only_in_the_database():
    from django.db import DatabaseError, transaction

    user = make_user()
    entry = grant_credits(user=user, amount=Decimal("5"), reason="t", created_by=None)
    for change in (lambda: LedgerEntry.objects.filter(pk=entry.pk).update(amount=Decimal("500")),
                   lambda: LedgerEntry.objects.filter(pk=entry.pk).update(reason="edited"),
                   lambda: LedgerEntry.objects.filter(pk=entry.pk).delete()):
        with pytest.raises(DatabaseError), transaction.atomic():
            change()
    with pytest.raises(ValueError):
        entry.save()
    LedgerEntry.objects.filter(pk=entry.pk).update(usage_record=None)  # the SET_NULL links may still change
    assert LedgerEntry.objects.get(pk=entry.pk).amount == Decimal("5")


def test_balance_can_never_go_below_zero_in_the_database():
    from django.db import IntegrityError, transaction

    user = make_user()
    grant_credits(user=user, amount=Decimal("1"), reason="t", created_by=None)
    with pytest.raises(IntegrityError), transaction.atomic():
        CreditAccount.objects.filter(user=user).update(balance=Decimal("-0.0000000001"))
    with pytest.raises(IntegrityError), transaction.atomic():
        CreditAccount.objects.filter(user=user).update(reserved=Decimal("1.5"))  # more held than there is
    assert CreditAccount.objects.get(user=user).balance == 1
