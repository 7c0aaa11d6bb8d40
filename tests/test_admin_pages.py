"""Every admin page renders for an operator, and only for staff; list pages keep their query counts flat."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.contrib import admin
from django.urls import reverse
from django.utils import timezone

from conversations.models import Conversation, Message
from tests.factories import make_agent, make_api_key, make_user
from usage.models import (
    AdminDebugLog,
    BillingSyncState,
    CreditAccount,
    LedgerEntry,
    Quota,
    QuotaAlert,
    UsageRecord,
)

pytestmark = pytest.mark.django_db

OUR_APPS = {"agents", "conversations", "usage"}


def _usage(user, agent=None, **extra) -> UsageRecord:
    fields = {"provider": "demo", "model": agent.model.name if agent else "demo-chat", "prompt_tokens": 10,
              "completion_tokens": 5, "total_tokens": 15, "cost": Decimal("0.0012"), "entry_point": "chat",
              "charged": True, **extra}
    return UsageRecord.objects.create(user=user, agent=agent, **fields)


@pytest.fixture
def sample(operator):
    """One of everything, so each change page has an object to show."""
    alice = make_user("alice")
    agent = make_agent("writer")
    key, _ = make_api_key(alice, name="laptop")
    conversation = Conversation.objects.create(owner=alice, agent=agent, title="Hello", has_success=True)
    Message.objects.create(conversation=conversation, role="user", content="hi", sequence=1, status="success")
    record = _usage(alice, agent, api_key=key)
    account = CreditAccount.objects.create(user=alice, balance=Decimal("5"))
    LedgerEntry.objects.create(account=account, amount=Decimal("5"), kind="topup", balance_after=Decimal("5"))
    Quota.objects.create(user=alice, monthly_token_limit=1000)
    QuotaAlert.objects.create(user=alice, period=timezone.localdate().replace(day=1), level="warning", message="80%")
    AdminDebugLog.objects.create(staff_user=operator, agent=agent, action="run", cost=Decimal("0.01"))
    BillingSyncState.objects.create(user=alice)
    return {"agent": agent, "key": key, "record": record, "conversation": conversation}


def _our_models():
    return [m for m in admin.site._registry if m._meta.app_label in OUR_APPS]


def test_all_our_models_are_registered():
    names = {f"{m._meta.app_label}.{m._meta.model_name}" for m in _our_models()}
    expected = {"agents.provider", "agents.llmmodel", "agents.agent", "usage.apikey", "usage.creditaccount",
                "usage.ledgerentry", "usage.quota", "usage.quotaalert", "usage.usagerecord", "usage.admindebuglog",
                "usage.billingsyncstate", "usage.modelprice", "conversations.conversation",
                "conversations.message"}
    assert expected <= names


def test_every_changelist_and_change_page_renders(operator_client, sample):
    for model in _our_models():
        opts = model._meta
        url = reverse(f"admin:{opts.app_label}_{opts.model_name}_changelist")
        response = operator_client.get(url)
        assert response.status_code == 200, url
        obj = model._default_manager.first()
        if obj is not None:
            url = reverse(f"admin:{opts.app_label}_{opts.model_name}_change", args=[obj.pk])
            assert operator_client.get(url).status_code == 200, url


def test_add_pages_render_where_adding_is_allowed(operator_client):
    for name in ("agents_provider", "agents_llmmodel", "agents_agent", "usage_quota"):
        assert operator_client.get(reverse(f"admin:{name}_add")).status_code == 200, name


def test_records_written_by_the_system_cannot_be_added_or_edited(operator_client, sample):
    for name in ("usage_usagerecord", "usage_ledgerentry", "usage_admindebuglog", "usage_apikey",
                 "usage_creditaccount", "conversations_message"):
        assert operator_client.get(reverse(f"admin:{name}_add")).status_code == 403, name
    record = sample["record"]
    response = operator_client.post(reverse("admin:usage_usagerecord_change", args=[record.pk]), {"cost": "0"})
    assert response.status_code == 403
    record.refresh_from_db()
    assert record.cost == Decimal("0.0012")


def test_non_staff_is_sent_to_the_admin_login(client, sample):
    client.force_login(make_user("bob"))
    for url in ("/admin/", reverse("admin:agents_provider_changelist"), reverse("admin-dashboard"),
                reverse("admin:agents_agent_debug", args=[sample["agent"].pk]),
                reverse("admin:usage_creditaccount_topup")):
        response = client.get(url)
        assert response.status_code == 302, url
        assert response["Location"].startswith("/admin/login/"), url


def test_staff_without_permissions_sees_no_models(client, sample):
    client.force_login(make_user("helper", staff=True))
    assert client.get(reverse("admin:usage_usagerecord_changelist")).status_code == 403
    assert client.get(reverse("admin:usage_creditaccount_topup")).status_code == 403
    assert client.get(reverse("admin:agents_agent_debug", args=[sample["agent"].pk])).status_code == 403


def test_admin_index_links_the_dashboard(operator_client):
    response = operator_client.get("/admin/")
    assert response.status_code == 200
    assert reverse("admin-dashboard").encode() in response.content


@pytest.mark.parametrize("name", ["usage_usagerecord", "usage_apikey", "usage_ledgerentry", "usage_creditaccount",
                                  "conversations_conversation", "conversations_message", "agents_agent",
                                  "agents_llmmodel", "usage_admindebuglog", "usage_quota"])
def test_changelist_query_count_does_not_grow_with_rows(operator_client, operator, name, django_assert_max_num_queries):
    def fill(n: int) -> None:
        for i in range(n):
            user = make_user()
            agent = make_agent(f"{name[:6]}{i}{user.pk}")
            key, _ = make_api_key(user)
            conv = Conversation.objects.create(owner=user, agent=agent, title=f"c{i}")
            Message.objects.create(conversation=conv, role="user", content="x", sequence=1)
            account = CreditAccount.objects.create(user=user, balance=Decimal("1"))
            LedgerEntry.objects.create(account=account, amount=Decimal("1"), kind="topup", balance_after=1,
                                       created_by=operator)
            _usage(user, agent, api_key=key)
            AdminDebugLog.objects.create(staff_user=operator, agent=agent, action="run")
            Quota.objects.create(user=user)

    url = reverse(f"admin:{name}_changelist")
    fill(2)
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as small:
        assert operator_client.get(url).status_code == 200
    fill(6)
    with django_assert_max_num_queries(len(small.captured_queries)):
        assert operator_client.get(url).status_code == 200


def test_every_object_has_a_readable_title_and_the_console_our_name(operator_client, sample):
    """No "CreditAccount object (1)": each of our objects says what it is; the header says aiwriter."""
    for model in _our_models():
        for obj in model._default_manager.all()[:3]:
            title = str(obj)
            assert "object (" not in title and title.strip(), f"{model.__name__}: {title!r}"
    assert str(CreditAccount.objects.get()) == "Credit of alice (5)"  # money in the one format, not 5.0000000000
    index = operator_client.get(reverse("admin:index")).content.decode()
    assert "Django administration" not in index and "aiwriter" in index


def test_quota_limits_say_that_0_means_unlimited(operator_client, sample):
    page = operator_client.get(reverse("admin:usage_quota_add")).content.decode()
    assert page.count("0 means unlimited") == 2
