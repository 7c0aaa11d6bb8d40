"""Balances in the admin: the ledger on each account, a top-up through usage.billing, quotas and alerts."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.urls import reverse

from tests.factories import make_user
from usage.models import CreditAccount, LedgerEntry

pytestmark = pytest.mark.django_db

TOPUP = "/admin/usage/creditaccount/topup/"


def _grant(user, amount: str) -> None:
    from usage.billing.ledger import grant_credits

    grant_credits(user=user, amount=Decimal(amount), reason="seed", created_by=None)


def test_topup_adds_credit_with_a_ledger_entry(operator_client, operator):
    alice = make_user("alice")
    response = operator_client.get(TOPUP, {"user": alice.pk})
    assert response.status_code == 200
    assert f'<option value="{alice.pk}" selected>'.encode() in response.content
    response = operator_client.post(TOPUP, {"user": alice.pk, "amount": "12.5", "kind": "topup",
                                            "reason": "Invoice 42"})
    assert response.status_code == 302
    account = CreditAccount.objects.get(user=alice)
    assert account.balance == Decimal("12.5")
    entry = LedgerEntry.objects.get(account=account, reason="Invoice 42")
    assert (entry.kind, entry.amount, entry.created_by) == ("topup", Decimal("12.5"), operator)


def test_a_negative_topup_is_refused_but_an_adjustment_works(operator_client):
    alice = make_user("alice")
    _grant(alice, "10")
    response = operator_client.post(TOPUP, {"user": alice.pk, "amount": "-3", "kind": "topup", "reason": "x"})
    assert response.status_code == 200 and b"use an adjustment" in response.content
    response = operator_client.post(TOPUP, {"user": alice.pk, "amount": "-3", "kind": "adjustment",
                                            "reason": "refund to card"})
    assert response.status_code == 302
    assert CreditAccount.objects.get(user=alice).balance == Decimal("7")


def test_an_adjustment_below_zero_shows_the_service_error(operator_client):
    alice = make_user("alice")
    _grant(alice, "1")
    response = operator_client.post(TOPUP, {"user": alice.pk, "amount": "-5", "kind": "adjustment", "reason": "x"})
    assert response.status_code == 200
    assert b"errornote" in response.content or b"errorlist" in response.content
    assert CreditAccount.objects.get(user=alice).balance == Decimal("1")


def test_account_page_shows_the_ledger(operator_client):
    alice = make_user("alice")
    _grant(alice, "3")
    _grant(alice, "4")
    account = CreditAccount.objects.get(user=alice)
    response = operator_client.get(reverse("admin:usage_creditaccount_change", args=[account.pk]))
    body = response.content.decode()
    assert 'class="aiw-ledger"' in body
    assert body.count("<td>topup</td>") == 2
    assert "<td>7</td>" in body  # balance after, in the one money format
    assert "0000000" not in body


def test_list_links_to_topup_and_the_action_redirects_there(operator_client):
    alice = make_user("alice")
    _grant(alice, "1")
    account = CreditAccount.objects.get(user=alice)
    changelist = reverse("admin:usage_creditaccount_changelist")
    assert f"{TOPUP}?user={alice.pk}".encode() in operator_client.get(changelist).content
    response = operator_client.post(changelist, {"action": "top_up", "_selected_action": [account.pk]})
    assert response.status_code == 302 and response["Location"] == f"{TOPUP}?user={alice.pk}"


def test_reason_and_names_are_escaped_in_the_ledger(operator_client):
    alice = make_user("alice")
    from usage.billing.ledger import grant_credits

    grant_credits(user=alice, amount=Decimal("1"), reason="<script>alert(1)</script>", created_by=None)
    account = CreditAccount.objects.get(user=alice)
    body = operator_client.get(reverse("admin:usage_creditaccount_change", args=[account.pk])).content
    assert b"<script>alert(1)</script>" not in body and b"&lt;script&gt;" in body


def test_quota_can_be_set_for_a_user(operator_client):
    alice = make_user("alice")
    response = operator_client.post(reverse("admin:usage_quota_add"), {
        "user": alice.pk, "project": "", "monthly_token_limit": "5000", "monthly_cost_limit": "10"})
    assert response.status_code == 302
    assert alice.quotas.get().monthly_token_limit == 5000
    assert b"(all projects)" in operator_client.get(reverse("admin:usage_quota_changelist")).content
