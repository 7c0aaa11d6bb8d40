"""Property test: a state machine over the real credit and quota services.

Rules: top-up, refund, negative adjustment, a whole metered call, a hold (reservation) for a call in flight, its
settle (any actual tokens, even more than the hold covered), its release, a reconcile that releases stale holds
behind a call's back, consumption reported by another service, a quota change and the month rolling over.

After every step: balance >= 0, 0 <= reserved <= balance, balance == the sum of the ledger, reserved == the sum of
the holds still held, every charge <= its record's cost, and the month's token counter == the tokens of the calls
counted in that month. Refusals are checked too: a hold is refused exactly when the free balance is short, a call
exactly when the month's tokens reached the quota.
"""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
from django.conf import settings as django_settings
from django.db import transaction
from django.utils import timezone
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    precondition,
    rule,
)

from agents.llm.types import ChatRequest
from aiwriter.money import call_cost, quantize
from tests.factories import make_model, make_user
from usage import periods
from usage.billing.calls import CallOutcome, call_meta
from usage.billing.consumption import record_consumption
from usage.billing.holds import begin_call, worst_case_cost
from usage.billing.ledger import grant_credits
from usage.billing.reconcile import reconcile_reservations
from usage.billing.recording import record_call
from usage.errors import InsufficientBalance, QuotaExceeded
from usage.metering import CallContext
from usage.models import CreditAccount, LedgerEntry, Quota, Reservation, UsageCounter, UsageRecord

pytestmark = pytest.mark.django_db

INPUT, OUTPUT = Decimal("3"), Decimal("15")  # per million tokens
# Amounts from one smallest unit (1e-10) up to 0.2: up to a few calls' worth.
amounts = st.one_of(st.integers(min_value=1, max_value=1000),
                    st.integers(min_value=1, max_value=2_000_000_000)).map(lambda n: Decimal(n) * Decimal("1e-10"))
tokens = st.integers(min_value=0, max_value=4000)
max_out = st.integers(min_value=1, max_value=2000)


def _tolerance() -> Decimal:
    # SQLite stores decimals as floats; PostgreSQL keeps them exact to the last place.
    return Decimal(0) if django_settings.IS_POSTGRES else Decimal("1e-6")


class LedgerMachine(RuleBasedStateMachine):
    holds = Bundle("holds")

    def __init__(self) -> None:
        super().__init__()
        self.user = make_user()
        self.staff = make_user(staff=True)
        self.model = make_model(input_price=str(INPUT), output_price=str(OUTPUT))
        self.now = timezone.now() + timedelta(seconds=1)  # the machine's clock: only moves forward
        self.counted: dict = {}  # quota period -> tokens of the calls counted in it
        self.token_limit = 0
        self.n = 0

    # --- helpers ---------------------------------------------------------------------------------------------

    def _account(self) -> CreditAccount | None:
        return CreditAccount.objects.filter(user=self.user).first()

    def _free(self) -> Decimal:
        account = self._account()
        return account.balance - account.reserved if account else Decimal(0)

    def _ctx(self) -> CallContext:
        return CallContext(user=self.user, entry_point="chat", now=self.now)

    def _request(self, max_tokens: int) -> ChatRequest:
        return ChatRequest(model=self.model.name, messages=[{"role": "user", "content": "hi"}], max_tokens=max_tokens)

    def _period(self):
        return periods.month_start(self.now)

    def _begin(self, max_tokens: int):
        """begin_call, checking that a refusal happens exactly when it should."""
        request = self._request(max_tokens)
        need = worst_case_cost(request, self.now)
        used = self.counted.get(self._period(), 0)
        free = self._free()
        try:
            plan = begin_call(ctx=self._ctx(), request=request, now=self.now)
        except QuotaExceeded:
            assert self.token_limit and used >= self.token_limit
            return None
        except InsufficientBalance:
            assert not (self.token_limit and used >= self.token_limit)
            assert free < need
            return None
        assert not (self.token_limit and used >= self.token_limit)
        assert free >= need - _tolerance() and plan.reserved == need
        return plan

    def _record(self, plan, prompt: int, completion: int, billable: bool = True) -> UsageRecord:
        outcome = CallOutcome(status="success" if billable else "error", model=self.model.name, provider="test",
                              prompt_tokens=prompt, completion_tokens=completion, billable=billable)
        record, _ = record_call(meta=call_meta(self._ctx()), plan=plan, outcome=outcome)
        expected = call_cost(self.model_price(), prompt_tokens=prompt, completion_tokens=completion)
        assert record.cost == expected
        if billable:
            self.counted[plan.period] = self.counted.get(plan.period, 0) + prompt + completion
        return record

    def model_price(self):
        from usage.pricing import price_at

        return price_at(self.model.name, self.now)

    # --- rules -------------------------------------------------------------------------------------------------

    @initialize(start=st.sampled_from(["0", "0.0000001", "0.05", "1"]))
    def opening_balance(self, start):
        if start != "0":
            grant_credits(user=self.user, amount=Decimal(start), reason="opening", created_by=self.staff)

    @rule(amount=amounts)
    def top_up(self, amount):
        grant_credits(user=self.user, amount=amount, reason="top-up", created_by=self.staff)

    @rule(amount=amounts)
    def refund(self, amount):
        grant_credits(user=self.user, amount=amount, reason="refund", created_by=self.staff,
                      kind=LedgerEntry.Kind.REFUND)

    @rule(amount=amounts)
    def take_back(self, amount):
        account = self._account()
        try:
            grant_credits(user=self.user, amount=-amount, reason="correction", created_by=self.staff,
                          kind=LedgerEntry.Kind.ADJUSTMENT)
        except InsufficientBalance:
            assert account is None or account.balance - amount < account.reserved
        else:
            assert account is not None and account.balance - amount >= account.reserved - _tolerance()

    @rule(max_tokens=max_out, prompt=tokens, completion=tokens)
    def whole_call(self, max_tokens, prompt, completion):
        plan = self._begin(max_tokens)
        if plan is not None:
            self._record(plan, prompt, min(completion, max_tokens))

    @rule(target=holds, max_tokens=max_out)
    def hold(self, max_tokens):
        plan = self._begin(max_tokens)
        return plan if plan is not None else "refused"

    @rule(plan=consumes(holds), prompt=tokens, completion=tokens)
    def settle(self, plan, prompt, completion):
        """Any actual tokens, even past the hold (a pricier fallback): charged at most what the account has."""
        if plan == "refused":
            return
        balance_before = self._account().balance
        record = self._record(plan, prompt, completion)
        charged = -sum(e.amount for e in LedgerEntry.objects.filter(usage_record=record))
        assert Decimal(0) <= charged <= record.cost
        assert charged <= balance_before
        if charged < record.cost:
            assert record.metadata.get("uncharged")

    @rule(plan=consumes(holds), prompt=tokens)
    def release(self, plan, prompt):
        """The call failed before any output: recorded, not charged, the hold released."""
        if plan == "refused":
            return
        balance_before = self._account().balance
        record = self._record(plan, prompt, 0, billable=False)
        assert not record.charged
        assert self._account().balance == balance_before
        assert not LedgerEntry.objects.filter(usage_record=record).exists()

    @rule()
    def reconcile_stale_holds(self):
        """A sweeper releases every hold in flight; the calls still settle later, without double-releasing."""
        reconcile_reservations(older_than=timedelta(0), now=timezone.now() + timedelta(seconds=1))
        assert not Reservation.objects.filter(account__user=self.user, status=Reservation.Status.HELD).exists()

    @rule(used=tokens)
    def consumption_reported(self, used):
        self.n += 1
        response, created = record_consumption(caller=self.staff, user=self.user, workflow_type="batch",
                                               tokens_used=used, idempotency_key=f"k{self.n}",
                                               model=self.model.name, now=self.now)
        assert created
        self.counted[self._period()] = self.counted.get(self._period(), 0) + used
        assert Decimal(response["cost"]) == call_cost(self.model_price(), prompt_tokens=0, completion_tokens=used)

    @rule(limit=st.sampled_from([0, 1, 500, 5000, 20000]))
    def set_quota(self, limit):
        Quota.objects.update_or_create(user=self.user, project="", defaults={"monthly_token_limit": limit})
        self.token_limit = limit

    @precondition(lambda self: self.now < timezone.now() + timedelta(days=400))
    @rule(days=st.integers(min_value=1, max_value=40))
    def time_passes(self, days):
        """Month rollover: a new quota period starts from zero; money is untouched."""
        self.now += timedelta(days=days)

    # --- invariants ----------------------------------------------------------------------------------------------

    @invariant()
    def money_adds_up(self):
        account = self._account()
        if account is None:
            return
        account.refresh_from_db()
        ledger = sum((e for e in LedgerEntry.objects.filter(account=account).values_list("amount", flat=True)),
                     Decimal(0))
        held = sum((r for r in Reservation.objects.filter(account=account, status=Reservation.Status.HELD)
                    .values_list("amount", flat=True)), Decimal(0))
        assert account.balance >= 0
        assert 0 <= account.reserved <= account.balance
        assert abs(account.balance - quantize(ledger)) <= _tolerance(), (account.balance, ledger)
        assert abs(account.reserved - quantize(held)) <= _tolerance(), (account.reserved, held)

    @invariant()
    def quota_counters_add_up(self):
        counters = dict(UsageCounter.objects.filter(user=self.user, project="").values_list("period", "tokens"))
        assert counters == {p: t for p, t in self.counted.items() if t or p in counters}


@pytest.mark.timeout(300)
def test_ledger_state_machine():
    from hypothesis.stateful import run_state_machine_as_test

    # Each example runs in a savepoint, so a failing step cannot leave a broken transaction for the next one.
    class Machine(LedgerMachine):
        def __init__(self):
            self._atomic = transaction.atomic()
            self._atomic.__enter__()
            super().__init__()

        def teardown(self):
            transaction.set_rollback(True)
            self._atomic.__exit__(None, None, None)

    run_state_machine_as_test(Machine, settings=settings(
        max_examples=60, stateful_step_count=30, deadline=None, derandomize=True, database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    ))
