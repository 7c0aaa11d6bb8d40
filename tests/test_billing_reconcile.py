"""A database error after the upstream served a call: the hold stays, reconcile charges it. Never a free call."""

import io
from datetime import timedelta
from decimal import Decimal

import pytest
from asgiref.sync import sync_to_async
from django.core.management import call_command
from django.db import connection
from django.utils import timezone

from agents.llm import tokens
from agents.llm.types import ChatRequest
from tests.factories import make_fake_model, make_user
from usage.billing.ledger import grant_credits
from usage.billing.reconcile import reconcile_reservations
from usage.metering import CallContext, metered_complete
from usage.models import CreditAccount, LedgerEntry, Reservation, UsageRecord
from usage.periods import local_day
from usage.selectors import UsageFilter, quota_status, usage_stats

pytestmark = [pytest.mark.pg, pytest.mark.django_db(transaction=True),
              pytest.mark.usefixtures("close_thread_connections")]

MESSAGES = [{"role": "user", "content": "Say something."}]


def _break_usage_inserts():
    # A real database error, raised by PostgreSQL itself on the record's INSERT.
    with connection.cursor() as cursor:
        cursor.execute("""
            CREATE OR REPLACE FUNCTION aiw_test_fail() RETURNS trigger AS $$
            BEGIN RAISE EXCEPTION 'simulated outage'; END $$ LANGUAGE plpgsql;
            CREATE TRIGGER aiw_test_fail BEFORE INSERT ON usage_usagerecord
            FOR EACH ROW EXECUTE FUNCTION aiw_test_fail();
        """)


def _repair_usage_inserts():
    with connection.cursor() as cursor:
        cursor.execute("DROP TRIGGER IF EXISTS aiw_test_fail ON usage_usagerecord; "
                       "DROP FUNCTION IF EXISTS aiw_test_fail();")


async def test_db_error_after_upstream_success_is_reconciled_not_free(fake_upstream):
    user = await sync_to_async(make_user)()
    model = await sync_to_async(make_fake_model)(fake_upstream, "flaky-db", input_price="1", output_price="2")
    fake_upstream.configure("flaky-db", tokens=9)
    await sync_to_async(grant_credits)(user=user, amount=Decimal("1"), reason="t", created_by=None)
    ctx = CallContext(user=user, entry_point="chat")
    await sync_to_async(_break_usage_inserts)()
    try:
        metered = await metered_complete(ctx, ChatRequest(model=model.name, messages=MESSAGES, max_tokens=20))
    finally:
        await sync_to_async(_repair_usage_inserts)()
    assert metered.pending_reconcile and metered.result.content and fake_upstream.completions == 1
    expected = (Decimal(tokens.count_messages(MESSAGES)) * 1 + 9 * Decimal(2)) / Decimal(1_000_000)
    assert metered.cost == expected

    def check_and_reconcile():
        assert UsageRecord.objects.count() == 0
        hold = Reservation.objects.get()
        assert hold.status == "held" and hold.result["completion_tokens"] == 9
        account = CreditAccount.objects.get(user=user)
        assert account.reserved == hold.amount and account.balance == 1  # held, not free, not yet charged
        out = io.StringIO()
        call_command("reconcile_reservations", "--older-than", "0", stdout=out)
        assert "charged 1, released 0" in out.getvalue()
        assert reconcile_reservations(older_than=timedelta(0)) == {"charged": 0, "released": 0}  # safe twice

    await sync_to_async(check_and_reconcile)()
    record = await sync_to_async(UsageRecord.objects.get)()
    assert record.cost == expected and record.charged and record.metadata["reconciled"]
    assert await sync_to_async(UsageRecord.objects.count)() == fake_upstream.completions
    account = await sync_to_async(CreditAccount.objects.get)(user=user)
    assert account.balance == Decimal(1) - expected and account.reserved == 0
    assert await sync_to_async(LedgerEntry.objects.filter(kind="charge").count)() == 1


def test_stale_hold_without_outcome_is_released_by_the_command():
    user = make_user()
    grant_credits(user=user, amount=Decimal("1"), reason="t", created_by=None)
    account = CreditAccount.objects.get(user=user)
    CreditAccount.objects.filter(pk=account.pk).update(reserved=Decimal("0.5"))
    hold = Reservation.objects.create(account=account, amount=Decimal("0.5"), context={
        "user_id": user.pk, "entry_point": "chat", "model": "x"})
    Reservation.objects.filter(pk=hold.pk).update(created_at=hold.created_at - timedelta(hours=2))
    out = io.StringIO()
    call_command("reconcile_reservations", stdout=out)
    assert "released 1" in out.getvalue()
    account.refresh_from_db()
    assert account.reserved == 0 and account.balance == 1
    assert Reservation.objects.get().status == "released"


def test_charge_unknown_bills_the_hold_rather_than_a_free_call():
    user = make_user()
    grant_credits(user=user, amount=Decimal("1"), reason="t", created_by=None)
    account = CreditAccount.objects.get(user=user)
    CreditAccount.objects.filter(pk=account.pk).update(reserved=Decimal("0.25"))
    hold = Reservation.objects.create(account=account, amount=Decimal("0.25"), context={
        "user_id": user.pk, "entry_point": "chat", "model": "x"})
    Reservation.objects.filter(pk=hold.pk).update(created_at=hold.created_at - timedelta(hours=2))
    out = io.StringIO()
    call_command("reconcile_reservations", "--charge-unknown", stdout=out)
    assert "charged 1" in out.getvalue()
    account.refresh_from_db()
    assert account.reserved == 0 and account.balance == Decimal("0.75")
    record = UsageRecord.objects.get()
    assert record.charged and record.cost == Decimal("0.25") and record.error_code == "reconciled_unknown"
    assert LedgerEntry.objects.get(kind="charge").amount == Decimal("-0.25")
    # The late charge counts toward the quota, and the rollups still agree with the records.
    assert quota_status(user=user)["usage"]["cost"] == "0.25"
    day = local_day(record.created_at)
    flt = UsageFilter(user_id=user.pk, start=day, end=day)
    assert usage_stats(flt) == usage_stats(flt, source="records")
    assert usage_stats(flt)["totals"]["cost"] == "0.25"


async def test_reconcile_with_default_arguments_charges_a_fresh_hold_whose_outcome_was_saved(fake_upstream):
    # Its call is over (the outcome is only saved after it ended): no need to wait an hour to bill it.
    user = await sync_to_async(make_user)()
    model = await sync_to_async(make_fake_model)(fake_upstream, "flaky-db", input_price="1", output_price="2")
    fake_upstream.configure("flaky-db", tokens=9)
    await sync_to_async(grant_credits)(user=user, amount=Decimal("1"), reason="t", created_by=None)
    await sync_to_async(_break_usage_inserts)()
    try:
        metered = await metered_complete(CallContext(user=user, entry_point="chat"),
                                         ChatRequest(model=model.name, messages=MESSAGES, max_tokens=20))
    finally:
        await sync_to_async(_repair_usage_inserts)()
    assert metered.pending_reconcile

    def reconcile_with_defaults():
        out = io.StringIO()
        call_command("reconcile_reservations", stdout=out)
        assert "charged 1, released 0" in out.getvalue()

    await sync_to_async(reconcile_with_defaults)()
    records = await sync_to_async(list)(UsageRecord.objects.all())
    assert len(records) == fake_upstream.completions == 1
    assert records[0].charged and records[0].cost == metered.cost
    charges = await sync_to_async(list)(LedgerEntry.objects.filter(kind="charge").values_list("amount", flat=True))
    assert charges == [-metered.cost]


def test_the_sweeper_charges_a_dead_replys_saved_outcome_not_an_estimate(alice, fake_upstream):
    from conversations import services as conversation_services
    from conversations.models import Conversation, Message
    from tests.factories import make_agent
    from usage.billing.calls import CallOutcome, CallPlan, call_meta
    from usage.billing.holds import begin_call as hold
    from usage.billing.reconcile import save_pending_result

    chat_agent = make_agent("priced", model=make_fake_model(fake_upstream, "priced-gpt", input_price="1",
                                                            output_price="2"))
    grant_credits(user=alice, amount=Decimal("1"), reason="t", created_by=None)
    conversation = Conversation.objects.create(owner=alice, agent=chat_agent)
    exchange = conversation_services.begin_exchange(user=alice, conversation=conversation, content="hello")
    conversation_services.release_lock(exchange)
    ctx = CallContext(user=alice, entry_point="ws", conversation=conversation, message=exchange.reply,
                      agent=chat_agent)
    request = ChatRequest(model=chat_agent.model.name, messages=MESSAGES, max_tokens=20)
    plan: CallPlan = hold(ctx=ctx, request=request)
    assert call_meta(ctx).message_id == exchange.reply.pk
    outcome = CallOutcome(status="success", model=chat_agent.model.name, prompt_tokens=11, completion_tokens=17)
    assert save_pending_result(plan=plan, outcome=outcome)  # served; its record could not be written
    Message.objects.filter(pk=exchange.reply.pk).update(updated_at=timezone.now() - timedelta(hours=1))
    conversation_services.sweep_stuck_messages(older_than_seconds=60)  # nothing was checkpointed on the reply
    record = UsageRecord.objects.get(message_id=exchange.reply.pk)
    assert record.prompt_tokens == 11 and record.completion_tokens == 17 and record.status == "success"
    assert Reservation.objects.get().status in ("settled", "released")
