"""Credit accounts and their ledger: new accounts, grants, the conditional hold and settle UPDATEs, charges.

A hold is a conditional UPDATE (`balance - reserved >= amount`), so concurrent calls can never over-commit;
CHECK constraints (balance >= 0, reserved <= balance) back every UPDATE."""

from __future__ import annotations

from decimal import Decimal
from typing import TYPE_CHECKING

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from aiwriter.errors import ApiError
from aiwriter.money import MONEY_LIMIT, ZERO, quantize
from usage.billing.sql import _dec, _num, _q
from usage.errors import InsufficientBalance
from usage.models import CreditAccount, LedgerEntry, UsageRecord

if TYPE_CHECKING:
    from django.contrib.auth.models import User


# --- Accounts and credits -----------------------------------------------------------------------------------------

def ensure_account(user: User) -> CreditAccount:
    """The user's credit account; a new one starts with settings.NEW_USER_CREDIT (as a ledger top-up)."""
    account = CreditAccount.objects.filter(user=user).first()
    if account is not None:
        return account
    credit = quantize(settings.NEW_USER_CREDIT)
    with transaction.atomic():
        account, created = CreditAccount.objects.get_or_create(user=user, defaults={"balance": credit})
        if created and credit > 0:
            LedgerEntry.objects.create(account=account, amount=credit, kind=LedgerEntry.Kind.TOPUP,
                                       reason="New account credit", balance_after=credit)
    return account


def grant_credits(*, user: User, amount: Decimal, reason: str, created_by: User | None,
                  kind: str = LedgerEntry.Kind.TOPUP) -> LedgerEntry:
    """Adds (or, as an adjustment, removes) credit. A top-up must be positive; nothing goes below what is held."""
    amount = quantize(Decimal(amount))
    if kind not in (LedgerEntry.Kind.TOPUP, LedgerEntry.Kind.ADJUSTMENT, LedgerEntry.Kind.REFUND):
        raise ApiError(f"Credits cannot be granted as '{kind}'.", code="invalid")
    if amount == 0 or (amount < 0 and kind != LedgerEntry.Kind.ADJUSTMENT):
        raise ApiError("The amount must be positive (a negative amount is an adjustment).", code="invalid")
    ensure_account(user)
    with transaction.atomic():
        account = CreditAccount.objects.select_for_update().get(user=user)
        if account.balance + amount < account.reserved:
            raise InsufficientBalance("The adjustment would take the balance below zero or below what is held.")
        if account.balance + amount >= MONEY_LIMIT:  # the column would overflow: a 500 otherwise
            raise ApiError(f"The balance would pass the largest amount kept ({MONEY_LIMIT - 1}).", code="invalid")
        account.balance += amount
        account.save(update_fields=["balance", "updated_at"])
        return LedgerEntry.objects.create(account=account, amount=amount, kind=kind, reason=reason[:255],
                                          created_by=created_by, balance_after=account.balance)


def _hold(user_id: int, amount: Decimal) -> int | None:
    """Holds `amount` if the free balance covers it; returns the account id, or None when short (or no account)."""
    table = _q(CreditAccount._meta.db_table)
    sql = (f"UPDATE {table} SET reserved = reserved + CAST(%s AS NUMERIC), updated_at = %s "
           f"WHERE user_id = %s AND balance - reserved >= CAST(%s AS NUMERIC) RETURNING id")
    with connection.cursor() as cursor:
        cursor.execute(sql, [_num(amount), connection.ops.adapt_datetimefield_value(timezone.now()), user_id,
                             _num(amount)])
        row = cursor.fetchone()
    return row[0] if row else None


def _settle_account(user_id: int, cost: Decimal, held: Decimal) -> tuple[Decimal, Decimal, int | None]:
    """Takes `cost` and drops `held` from the hold; returns (charged, balance after, account id or None).

    Charges at most the free balance plus this call's own hold: other calls' holds and zero are never crossed.
    """
    table = _q(CreditAccount._meta.db_table)
    sql = (f"UPDATE {table} SET balance = balance - CAST(%s AS NUMERIC), reserved = reserved - CAST(%s AS NUMERIC), "
           f"updated_at = %s WHERE user_id = %s AND balance - CAST(%s AS NUMERIC) >= reserved - CAST(%s AS NUMERIC) "
           f"RETURNING balance, id")
    with connection.cursor() as cursor:
        cursor.execute(sql, [_num(cost), _num(held), connection.ops.adapt_datetimefield_value(timezone.now()),
                             user_id, _num(cost), _num(held)])
        row = cursor.fetchone()
    if row is not None:
        return cost, _dec(row[0]), row[1]
    # Rare: the actual cost exceeds what the free balance covers (e.g. a pricier fallback). Charge what is there.
    account = CreditAccount.objects.select_for_update().filter(user_id=user_id).first()
    if account is None:
        return ZERO, ZERO, None
    held = min(held, account.reserved)
    charged = max(ZERO, min(cost, account.balance - (account.reserved - held)))
    account.balance -= charged
    account.reserved -= held
    account.save(update_fields=["balance", "reserved", "updated_at"])
    return charged, account.balance, account.pk


def charge_reason(model: str, entry_point: str) -> str:
    """A charge's ledger reason, for both the ORM path and the one-statement record."""
    return f"{model} ({entry_point})"[:255]


def _ledger_charge(account_id: int, charged: Decimal, balance_after: Decimal, record: UsageRecord, model: str,
                   entry_point: str) -> LedgerEntry:
    return LedgerEntry.objects.create(account_id=account_id, amount=-charged, kind=LedgerEntry.Kind.CHARGE,
                                      reason=charge_reason(model, entry_point), usage_record=record,
                                      balance_after=balance_after)
