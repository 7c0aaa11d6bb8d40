"""After a call: the record, the hold settled, the charge, the ledger entry, the counters and the rollup, in ONE
transaction (one statement on PostgreSQL's common case)."""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from django.db import DataError, connection, transaction
from django.db.models.signals import post_save
from django.utils import timezone

from aiwriter.db import vendor as db_vendor
from aiwriter.money import ZERO, call_cost
from usage import pricing
from usage.billing.calls import CallMeta, CallOutcome, CallPlan
from usage.billing.counters import _count, _maybe_alert, call_upserts, quota_scopes
from usage.billing.ledger import _ledger_charge, _settle_account, charge_reason, ensure_account
from usage.billing.sql import _dec, _q
from usage.models import CreditAccount, LedgerEntry, QuotaAlert, Reservation, UsageRecord

logger = logging.getLogger(__name__)


def outcome_cost(plan: CallPlan, outcome: CallOutcome) -> Decimal:
    """At the price in force when the call started; a response-cache hit costs 0."""
    if outcome.cache_hit:
        return ZERO
    return call_cost(pricing.price_at(outcome.model, plan.started_at), prompt_tokens=outcome.prompt_tokens,
                     cached_prompt_tokens=outcome.cached_prompt_tokens, completion_tokens=outcome.completion_tokens)


def new_record(*, meta: CallMeta, plan: CallPlan, outcome: CallOutcome, cost: Decimal, charge: bool) -> UsageRecord:
    """The call's usage record, unsaved: one definition for the general path and the one-statement record."""
    return UsageRecord(
        user_id=meta.user_id, project=meta.project, agent_id=meta.agent_id,
        conversation_id=meta.conversation_id, message_id=meta.message_id,
        api_key_id=meta.api_key_id, provider=outcome.provider, model=outcome.model,
        upstream_model=outcome.upstream_model, prompt_tokens=outcome.prompt_tokens,
        cached_prompt_tokens=outcome.cached_prompt_tokens, completion_tokens=outcome.completion_tokens,
        total_tokens=outcome.prompt_tokens + outcome.completion_tokens, token_source=outcome.token_source,
        cost=cost, cached=outcome.cache_hit, debug=meta.debug, fallback=outcome.fallback,
        charged=charge and cost > 0, status=outcome.status, error_code=outcome.error_code[:50],
        latency_ms=outcome.latency_ms, ttft_ms=outcome.ttft_ms, entry_point=meta.entry_point,
        workflow_type=meta.workflow_type, metadata=outcome.metadata,
        idempotency_key=meta.idempotency_key, created_at=plan.started_at,
    )


def record_call(*, meta: CallMeta, plan: CallPlan, outcome: CallOutcome) -> tuple[UsageRecord, list[QuotaAlert]]:
    """Writes the record, settles the hold, charges, counts and rolls up, all in one transaction.

    Returns the record and any quota alerts it raised; deliver those with `deliver_alerts` after this returns.
    """
    debug = meta.debug
    cost = outcome_cost(plan, outcome)
    charge = outcome.billable and not debug
    now = timezone.now()
    user_id = meta.user_id
    if db_vendor() == "postgresql" and not debug:
        try:
            return _record_call_pg(meta=meta, plan=plan, outcome=outcome, cost=cost, charge=charge, now=now)
        except _SlowPath:
            pass  # rolled back: the balance does not cover the cost (or no account); the general path below decides
    with transaction.atomic():
        record = new_record(meta=meta, plan=plan, outcome=outcome, cost=cost, charge=charge)
        record.save(force_insert=True)
        held = ZERO
        if plan.reservation_id:
            still_held = Reservation.objects.filter(pk=plan.reservation_id, status=Reservation.Status.HELD).update(
                status=Reservation.Status.SETTLED if charge else Reservation.Status.RELEASED, settled_at=now,
                usage_record=record)
            held = plan.reserved if still_held else ZERO  # a reconcile may have released it already
        to_charge = cost if charge else ZERO
        if to_charge > 0 or held > 0:
            charged, balance_after, account_id = _settle_account(user_id, to_charge, held)
            if charged != to_charge:
                if account_id is None:  # no account: a priced call that held nothing (e.g. a pricier fallback)
                    ensure_account(record.user)
                    charged, balance_after, account_id = _settle_account(user_id, to_charge, ZERO)
                if charged != to_charge:
                    logger.warning("usage record %s: cost %s exceeds the balance; charged %s", record.pk, cost,
                                   charged)
                    record.metadata = {**record.metadata, "uncharged": str(to_charge - charged)}
                    record.charged = charged > 0
                    record.save(update_fields=["metadata", "charged"])
            if charged > 0 and account_id is not None:  # charged: the account was there
                _ledger_charge(account_id, charged, balance_after, record, outcome.model, meta.entry_point)
        else:
            charged = ZERO
        alerts: list[QuotaAlert] = []
        if not debug:
            alerts = _count(meta=meta, plan=plan, record=record, charged=charged if charge else ZERO,
                            counted=charge)
    return record, alerts


class _SlowPath(Exception):
    """The one-statement path could not settle the call in full: roll it back and take the general path."""


@dataclass
class RecordStatement:
    record: UsageRecord  # unsaved: its pk comes back in the statement's row
    sql: str
    params: list[Any]
    scopes: list[str]  # counters the row reports (tokens, cost) for, in order


def record_statement(*, meta: CallMeta, plan: CallPlan, outcome: CallOutcome, cost: Decimal, charge: bool,
                     now: datetime) -> RecordStatement:
    """PostgreSQL: what record_call writes (record, hold settled, charge, ledger entry, counters, rollup) as ONE
    statement of data-modifying CTEs. Built once for both executors: the sync ORM connection (_record_call_pg)
    and the async pool (usage.hotpath).

    The common case only: the charge is covered in full. Otherwise (the balance no longer covers the cost, no
    account) the statement fails with division_by_zero (SLOW_PATH_SQLSTATE), so nothing of it stays, even in
    autocommit, and the caller goes the general way. Same rows, same values, same conditional updates as the
    general path; one round trip instead of six to nine, and no ORM compilation on the hot path.
    Its row: record id, 1, then (tokens, cost) of each counter in `scopes`.
    """
    user_id = meta.user_id
    to_charge = cost if charge else ZERO
    record = new_record(meta=meta, plan=plan, outcome=outcome, cost=cost, charge=charge)
    # The record's values travel as one JSON parameter: psycopg caches the parsing of a statement only up to 4 kB
    # and 50 parameters, and a literal per column would take this one past both.
    fields, insert = _record_insert()
    params: list[Any] = [json.dumps({f.column: f.pre_save(record, True) for f in fields}, default=str)]
    ctes = [insert]
    settles = bool(plan.reservation_id) or to_charge > 0
    if plan.reservation_id:
        ctes.append(f"res AS (UPDATE {_q(Reservation._meta.db_table)} SET status = %s, settled_at = %s, "
                    f"usage_record_id = (SELECT id FROM rec) WHERE id = %s AND status = %s RETURNING id)")
        params += [Reservation.Status.SETTLED if charge else Reservation.Status.RELEASED, now, plan.reservation_id,
                   Reservation.Status.HELD]
        # A reconcile may have released the hold already: then there is nothing of it to drop.
        held = "(%s * (SELECT count(*) FROM res))"
        held_params = [plan.reserved]
    else:
        held, held_params = "0", []
    if settles:
        ctes.append(f"acct AS (UPDATE {_q(CreditAccount._meta.db_table)} SET balance = balance - %s, "
                    f"reserved = reserved - {held}, updated_at = %s "
                    f"WHERE user_id = %s AND balance - %s >= reserved - {held} RETURNING id, balance)")
        params += [to_charge, *held_params, now, user_id, to_charge, *held_params]
    if to_charge > 0:
        ctes.append(f"led AS (INSERT INTO {_q(LedgerEntry._meta.db_table)} (account_id, amount, kind, reason, "
                    f"usage_record_id, balance_after, created_at) SELECT acct.id, %s, %s, %s, rec.id, acct.balance, %s "
                    f"FROM acct, rec)")
        params += [-to_charge, LedgerEntry.Kind.CHARGE, charge_reason(outcome.model, meta.entry_point), now]
    # The counters and the rollup: the same increments as the general path's (usage.billing.counters).
    scopes = quota_scopes(meta) if charge else []
    for i, upsert in enumerate(call_upserts(meta=meta, plan=plan, record=record, charged=to_charge, counted=charge)):
        upsert_sql, upsert_params = upsert.sql()
        ctes.append(f"u{i} AS ({upsert_sql})")
        params += upsert_params
    # Not covered (no account row updated): 1/0 aborts the whole statement, so no half-written call survives.
    picks = ["(SELECT id FROM rec)", "1 / (SELECT count(*) FROM acct)::int" if settles else "1"]
    # The month counters come first in call_upserts, one per scope.
    picks += [f"(SELECT tokens FROM u{i}), (SELECT cost FROM u{i})" for i in range(len(scopes))]
    sql = "WITH " + ", ".join(ctes) + " SELECT " + ", ".join(picks)
    return RecordStatement(record=record, sql=sql, params=params, scopes=scopes)


@functools.cache
def _record_insert() -> tuple[list[Any], str]:
    """The record's columns and its INSERT from one JSON parameter: the same on every call, so built once."""
    fields = [f for f in UsageRecord._meta.concrete_fields if not f.primary_key and f.column]
    columns = ", ".join(_q(f.column) for f in fields if f.column)
    table = _q(UsageRecord._meta.db_table)
    return fields, (f"rec AS (INSERT INTO {table} ({columns}) SELECT {columns} FROM jsonb_populate_record("
                    f"NULL::{table}, %s::jsonb) RETURNING id)")


# The record statement's "not covered" signal (division_by_zero): roll back and take the general path.
SLOW_PATH_SQLSTATE = "22012"


def record_saved(record: UsageRecord, record_id: int) -> UsageRecord:
    """The record as if the ORM had saved it; receivers of post_save (model-call metrics) see it."""
    record.pk = record_id
    record._state.adding, record._state.db = False, connection.alias
    post_save.send(sender=UsageRecord, instance=record, created=True, update_fields=None, raw=False,
                   using=connection.alias)
    return record


def _record_call_pg(*, meta: CallMeta, plan: CallPlan, outcome: CallOutcome, cost: Decimal, charge: bool,
                    now: datetime) -> tuple[UsageRecord, list[QuotaAlert]]:
    """record_statement on the ORM connection, in one transaction with any quota alert it raises."""
    stmt = record_statement(meta=meta, plan=plan, outcome=outcome, cost=cost, charge=charge, now=now)
    user_id, record = meta.user_id, stmt.record
    alerts: list[QuotaAlert] = []
    try:
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute(stmt.sql, stmt.params)
                row = cursor.fetchone()
            for i, scope in enumerate(stmt.scopes):
                limit = plan.limits.scopes.get(scope)
                if limit:
                    alert = _maybe_alert(user_id=user_id, project=scope, period=plan.period, limit=limit,
                                         tokens_used=int(row[2 + 2 * i]), cost_used=_dec(row[3 + 2 * i]))
                    if alert:
                        alerts.append(alert)
            record_saved(record, row[0])
    except DataError as exc:
        if getattr(exc.__cause__, "sqlstate", None) == SLOW_PATH_SQLSTATE:
            raise _SlowPath from None  # rolled back
        raise
    return record, alerts
