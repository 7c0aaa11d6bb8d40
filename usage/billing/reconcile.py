"""Holds left behind: outcomes saved on a hold, stale holds, calls whose worker died mid-stream."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, cast

from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from agents.llm import tokens
from aiwriter.money import ZERO
from usage import periods
from usage.billing.calls import CallMeta, CallOutcome, CallPlan
from usage.billing.counters import _count_late_charge, deliver_alerts
from usage.billing.ledger import _ledger_charge, _settle_account
from usage.billing.recording import record_call
from usage.models import QuotaAlert, Reservation, UsageRecord
from usage.selectors import quota_limits


def save_pending_result(*, plan: CallPlan, outcome: CallOutcome) -> bool:
    """After a failed record_call: keep the call's outcome on its hold for `reconcile_reservations`."""
    if not plan.reservation_id:
        return False
    return bool(Reservation.objects.filter(pk=plan.reservation_id, status=Reservation.Status.HELD)
                .update(result=outcome.as_json()))


def settle_pending_call(*, meta: CallMeta, plan: CallPlan, outcome: CallOutcome) -> UsageRecord | None:
    """A served call whose record could not be written (database unreachable): record and charge it now, once.

    Retried by `aiwriter.deferred` until the database is back. The hold's row lock and `status = held` make it
    settle once, whoever (this, the sweeper, reconcile) comes first; None when someone else did.
    """
    if not plan.reservation_id:
        record, alerts = record_call(meta=meta, plan=plan, outcome=outcome)
    else:
        with transaction.atomic():
            if not (Reservation.objects.select_for_update()
                    .filter(pk=plan.reservation_id, status=Reservation.Status.HELD).exists()):
                return None
            record, alerts = record_call(meta=meta, plan=plan, outcome=outcome)
    deliver_alerts(alerts)
    return record


# --- Reconcile stale holds ---------------------------------------------------------------------------------------

def _reservation_plan(reservation: Reservation) -> tuple[CallMeta, CallPlan]:
    context = reservation.context
    meta = CallMeta.from_json(context)
    started_at = datetime.fromisoformat(context["started_at"]) if context.get("started_at") else \
        reservation.created_at
    plan = CallPlan(started_at=started_at, period=periods.month_start(started_at),
                    limits=quota_limits(user_id=meta.user_id, project=meta.project),
                    reservation_id=reservation.pk, reserved=reservation.amount)
    return meta, plan


def _charge_saved_result(reservation: Reservation, meta: CallMeta, plan: CallPlan) -> list[QuotaAlert]:
    """The call's outcome was saved on its hold (its record could not be written): write the record, charge it."""
    outcome = CallOutcome(**cast(dict[str, Any], reservation.result))  # saved by save_pending_result
    outcome.metadata = {**outcome.metadata, "reconciled": True}
    return record_call(meta=meta, plan=plan, outcome=outcome)[1]


def reconcile_reservations(*, older_than: timedelta = timedelta(hours=1), charge_unknown: bool = False,
                           now: datetime | None = None) -> dict[str, int]:
    """Holds left behind: with a saved outcome, write its record and charge it (at any age: that call is over);
    without one, once older than `older_than`, release it (or, with `charge_unknown`, charge it all).

    Safe to run twice and alongside live calls: each hold is settled once (`status = held` guards every write).
    """
    cutoff = (now or timezone.now()) - older_than
    done = {"charged": 0, "released": 0}
    alerts: list[QuotaAlert] = []
    ids = list(Reservation.objects.filter(Q(created_at__lt=cutoff) | Q(result__isnull=False),
                                          status=Reservation.Status.HELD)
               .order_by("id").values_list("id", flat=True))
    for reservation_id in ids:
        with transaction.atomic():
            reservation = (Reservation.objects.select_for_update(skip_locked=True)
                           .filter(pk=reservation_id, status=Reservation.Status.HELD).first())
            if reservation is None:
                continue
            meta, plan = _reservation_plan(reservation)
            if reservation.result:
                alerts += _charge_saved_result(reservation, meta, plan)
                done["charged"] += 1
            elif reservation.created_at >= cutoff:
                continue  # its outcome was taken back (null) meanwhile: not stale yet
            elif charge_unknown:
                # Outcome unknown: bill the hold itself rather than risk a free call.
                outcome = CallOutcome(status=UsageRecord.Status.ERROR, model=reservation.context.get("model", ""),
                                      billable=False,
                                      token_source=UsageRecord.TokenSource.ESTIMATED, error_code="reconciled_unknown",
                                      metadata={"reconciled": True})
                record, _ = record_call(meta=meta, plan=plan, outcome=outcome)  # releases the hold
                charged, balance_after, account_id = _settle_account(meta.user_id, reservation.amount, ZERO)
                if charged > 0 and account_id is not None:  # charged: the account was there
                    _ledger_charge(account_id, charged, balance_after, record, outcome.model, "reconcile")
                    record.cost, record.charged = charged, True
                    record.save(update_fields=["cost", "charged"])
                    _count_late_charge(meta=meta, plan=plan, record=record, charged=charged)
                done["charged"] += 1
            else:
                _settle_account(meta.user_id, ZERO, reservation.amount)
                reservation.status, reservation.settled_at = Reservation.Status.RELEASED, timezone.now()
                reservation.save(update_fields=["status", "settled_at"])
                done["released"] += 1
    deliver_alerts(alerts)
    return done


def settle_abandoned_calls(*, message_id: int, prompt_tokens: int, delivered: str) -> list[UsageRecord]:
    """Holds of calls whose worker died mid-stream (the sweeper found their reply stuck in `processing`).

    A hold with its call's outcome saved on it is charged that outcome. Any other gets its usage record now:
    prompt + the text that arrived (checkpointed on the reply), estimated and billed as partial like any cut-off
    stream; the rest of the hold is released. Safe to run twice.
    """
    records = []
    ids = list(Reservation.objects.filter(status=Reservation.Status.HELD, context__message_id=message_id)
               .values_list("id", flat=True))
    for reservation_id in ids:
        with transaction.atomic():
            reservation = (Reservation.objects.select_for_update(skip_locked=True)
                           .filter(pk=reservation_id, status=Reservation.Status.HELD).first())
            if reservation is None:
                continue
            meta, plan = _reservation_plan(reservation)
            if reservation.result:  # the call ended and its outcome is known: that, not an estimate
                alerts = _charge_saved_result(reservation, meta, plan)
                records.append(UsageRecord.objects.get(pk=Reservation.objects.values_list(
                    "usage_record_id", flat=True).get(pk=reservation.pk)))
                deliver_alerts(alerts)
                continue
            model = reservation.context.get("model", "")
            completion = tokens.count_text(delivered, model)
            outcome = CallOutcome(status=UsageRecord.Status.ERROR, model=model, prompt_tokens=prompt_tokens,
                                  completion_tokens=completion, billable=completion > 0,
                                  token_source=UsageRecord.TokenSource.PARTIAL if completion else
                                  UsageRecord.TokenSource.ESTIMATED, error_code="worker_lost",
                                  metadata={"swept": True})
            record, alerts = record_call(meta=meta, plan=plan, outcome=outcome)
        deliver_alerts(alerts)
        records.append(record)
    return records
