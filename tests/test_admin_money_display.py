"""Money in the admin is shown in the one format (aiwriter.money.money_str): `1.5`, never `1.5000000000`.

Walks every page of our registered ModelAdmins (changelist, each object's change page, the add page where adding is
allowed, inlines included) and the admin's own pages (dashboard, agent debug, top-up) with money-bearing objects
present, and fails on a Decimal rendered with its ten stored places.
"""

from __future__ import annotations

import re
from decimal import Decimal

import pytest
from django.contrib import admin
from django.urls import reverse
from django.utils import timezone

from conversations.models import Conversation, Message
from tests.factories import make_agent, make_api_key, make_fake_model, make_user
from usage.models import (
    AdminDebugLog,
    BillingSyncState,
    CreditAccount,
    LedgerEntry,
    ModelPrice,
    Quota,
    QuotaAlert,
    UsageRecord,
)

pytestmark = pytest.mark.django_db

OUR_APPS = {"agents", "conversations", "usage"}
TEN_PLACES = re.compile(r"\d\.\d{10}")


@pytest.fixture
def money_everywhere(operator, fake_upstream):
    """One of every money-bearing object, with amounts that have trailing zeros in their ten stored places."""
    alice = make_user("alice")
    model = make_fake_model(fake_upstream, "priced", input_price="1.5", output_price="6", cached_input_price="0.75")
    ModelPrice.objects.create(model=model, input_per_million=Decimal("2.25"), output_per_million=Decimal("9"),
                              effective_from=timezone.now() + timezone.timedelta(days=2))  # scheduled
    agent = make_agent("writer", model=model)
    key, _ = make_api_key(alice, name="laptop")
    key.monthly_budget = Decimal("12.5")
    key.save(update_fields=["monthly_budget"])
    conversation = Conversation.objects.create(owner=alice, agent=agent, title="Hello", has_success=True)
    Message.objects.create(conversation=conversation, role="user", content="hi", sequence=1, status="success")
    Message.objects.create(conversation=conversation, role="assistant", content="hello", sequence=2,
                           status="success", prompt_tokens=10, completion_tokens=5, cost=Decimal("0.0000375"))
    UsageRecord.objects.create(user=alice, agent=agent, api_key=key, provider="fake", model=model.name,
                               prompt_tokens=10, completion_tokens=5, total_tokens=15, cost=Decimal("0.0000375"),
                               entry_point="chat", charged=True, latency_ms=12)
    account = CreditAccount.objects.create(user=alice, balance=Decimal("5.5"), reserved=Decimal("0.25"))
    LedgerEntry.objects.create(account=account, amount=Decimal("5.5"), kind="topup", balance_after=Decimal("5.5"))
    Quota.objects.create(user=alice, monthly_token_limit=1000, monthly_cost_limit=Decimal("7.5"))
    QuotaAlert.objects.create(user=alice, period=timezone.localdate().replace(day=1), level="warning", message="80%")
    BillingSyncState.objects.create(user=alice)
    # A real execution test, so the debug log's result holds what the debug tool really writes.
    response = _client_post(operator, reverse("admin:agents_agent_debug", args=[agent.pk]),
                            {"action": "run", "message": "Say hi"})
    assert response.status_code == 200
    assert AdminDebugLog.objects.filter(agent=agent, action="run").exists()
    return {"agent": agent}


def _client_post(user, url, data):
    from django.test import Client

    client = Client()
    client.force_login(user)
    return client.post(url, data)


def _pages(agent) -> list[str]:
    urls = [reverse("admin:index"), reverse("admin-dashboard"), reverse("admin:agents_agent_debug", args=[agent.pk]),
            reverse("admin:usage_creditaccount_topup")]
    for model in admin.site._registry:
        opts = model._meta
        if opts.app_label not in OUR_APPS:
            continue
        urls.append(reverse(f"admin:{opts.app_label}_{opts.model_name}_changelist"))
        urls.append(reverse(f"admin:{opts.app_label}_{opts.model_name}_add"))
        urls += [reverse(f"admin:{opts.app_label}_{opts.model_name}_change", args=[pk])
                 for pk in model._default_manager.values_list("pk", flat=True)]
    return urls


def test_no_admin_page_shows_money_with_ten_places(operator_client, money_everywhere):
    shown = 0
    for url in _pages(money_everywhere["agent"]):
        response = operator_client.get(url)
        assert response.status_code in (200, 403), url  # 403: an add page of records written by the system
        if response.status_code != 200:
            continue
        shown += 1
        body = response.content.decode()
        found = TEN_PLACES.findall(body)
        assert not found, f"{url} shows {found[:3]}"
    assert shown > 30  # the walk really saw the pages


def test_no_read_only_change_page_has_a_save_button(operator_client, operator, money_everywhere):
    """Issue 14: a page the operator may only look at offers no Save (every read-only admin, not a chosen few)."""
    from django.test import RequestFactory

    request = RequestFactory().get("/admin/")
    request.user = operator
    checked = 0
    for model, model_admin in admin.site._registry.items():
        opts = model._meta
        if opts.app_label not in OUR_APPS:
            continue
        for obj in model._default_manager.all()[:2]:
            if model_admin.has_change_permission(request, obj) and model is not CreditAccount:
                continue  # editable (a credit account's page has only read-only fields: no Save either)
            url = reverse(f"admin:{opts.app_label}_{opts.model_name}_change", args=[obj.pk])
            body = operator_client.get(url).content.decode()
            assert 'name="_save"' not in body and 'name="_continue"' not in body, url
            checked += 1
    assert checked >= 8


def test_the_one_format_is_what_the_pages_show(operator_client, money_everywhere):
    model = money_everywhere["agent"].model
    page = operator_client.get(reverse("admin:agents_llmmodel_change", args=[model.pk])).content.decode()
    prices = page.split('id="prices-group"')[1]
    assert "1.5" in prices and "0.75" in prices and "2.25" in prices
    conversation = Conversation.objects.get()
    page = operator_client.get(reverse("admin:conversations_conversation_change",
                                       args=[conversation.pk])).content.decode()
    assert "0.0000375" in page
    quota = Quota.objects.get()
    page = operator_client.get(reverse("admin:usage_quota_change", args=[quota.pk])).content.decode()
    assert 'value="7.5"' in page  # the editable limit, as typed, not 7.5000000000
