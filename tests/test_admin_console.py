"""The operator's admin as a console: money in the one format, read-only pages without Save buttons, readable debug
runs, a debug link from every agent, compact tables (issue 14, admin)."""

from __future__ import annotations

import re
from decimal import Decimal

import pytest
from django.urls import reverse

from tests.factories import make_agent, make_user
from usage.models import AdminDebugLog, CreditAccount, LedgerEntry, ModelPrice, UsageRecord

pytestmark = pytest.mark.django_db


def _record(user, **extra) -> UsageRecord:
    fields = {"provider": "p1", "model": "m1", "upstream_model": "m1-up", "total_tokens": 100,
              "cost": Decimal("2.5"), "entry_point": "chat", **extra}
    return UsageRecord.objects.create(user=user, **fields)


def _ledger(user) -> CreditAccount:
    account = CreditAccount.objects.create(user=user, balance=Decimal("2.5"), reserved=Decimal("0.125"))
    LedgerEntry.objects.create(account=account, amount=Decimal("2.5"), kind="topup", balance_after=Decimal("2.5"))
    return account


def _debug_log(operator, agent) -> AdminDebugLog:
    return AdminDebugLog.objects.create(
        staff_user=operator, agent=agent, action="run", provider="p1", model="m1", prompt_tokens=12,
        completion_tokens=7, cost=Decimal("0.0005725"), latency_ms=321,
        input={"messages": [{"role": "user", "content": "Say <hi>"}]},
        result={"ok": True, "content": "Hello <b>there</b>\nsecond line", "finish_reason": "stop",
                "fallback": False, "usage_record": 5})


def _pages(operator):
    alice = make_user("alice")
    agent = make_agent("writer")
    record = _record(alice)
    account = _ledger(alice)
    entry = account.entries.get()
    log = _debug_log(operator, agent)
    price = ModelPrice.objects.filter(model=agent.model).first()
    return {
        "usage record": (reverse("admin:usage_usagerecord_changelist"), reverse("admin:usage_usagerecord_change",
                                                                                  args=[record.pk])),
        "ledger": (reverse("admin:usage_ledgerentry_changelist"), reverse("admin:usage_ledgerentry_change",
                                                                            args=[entry.pk])),
        "account": (reverse("admin:usage_creditaccount_changelist"), reverse("admin:usage_creditaccount_change",
                                                                               args=[account.pk])),
        "debug log": (reverse("admin:usage_admindebuglog_changelist"), reverse("admin:usage_admindebuglog_change",
                                                                                 args=[log.pk])),
        "price": (reverse("admin:usage_modelprice_changelist"), reverse("admin:usage_modelprice_change",
                                                                          args=[price.pk])),
    }


def test_money_is_shown_in_the_one_format_in_lists_and_detail_pages(operator_client, operator):
    pages = _pages(operator)
    for name, urls in pages.items():
        for url in urls:
            body = operator_client.get(url).content.decode()
            # Never ten places (2.5000000000) nor a cut (0.0005): the one format of aiwriter.money.money_str.
            assert not re.search(r"\d\.\d*00000\b", body), (name, url)
    lists = {name: operator_client.get(urls[0]).content.decode() for name, urls in pages.items()}
    assert ">2.5<" in lists["usage record"] and ">2.5<" in lists["ledger"]
    assert ">2.375<" in lists["account"]  # available = balance - reserved
    assert ">0.0005725<" in lists["debug log"]


def test_read_only_pages_have_no_save_buttons(operator_client, operator):
    for name, (_, change_url) in _pages(operator).items():
        body = operator_client.get(change_url).content.decode()
        assert 'name="_save"' not in body, name
        assert 'name="_continue"' not in body and 'name="_addanother"' not in body, name


def test_a_debug_run_is_shown_as_separate_readable_fields(operator_client, operator):
    log = _debug_log(operator, make_agent("writer"))
    body = operator_client.get(reverse("admin:usage_admindebuglog_change", args=[log.pk])).content.decode()
    # The reply as escaped text on its own, the input as a message, the rest of the result as a table.
    assert re.search(r'class="readonly"><div class="aiw-reply">Hello &lt;b&gt;there&lt;/b&gt;\nsecond line</div>', body)
    assert '<div class="aiw-message"><strong>user</strong><div class="aiw-text">Say &lt;hi&gt;</div></div>' in body
    assert "<tr><th>finish_reason</th><td>stop</td></tr>" in body
    assert "<tr><th>content</th>" not in body  # not repeated inside the result
    assert '{"ok": true' not in body and "&quot;ok&quot;" not in body  # no JSON blob


def test_a_failed_debug_run_shows_its_error(operator_client, operator):
    log = AdminDebugLog.objects.create(staff_user=operator, agent=make_agent("writer"), action="run",
                                       result={"ok": False, "error": {"code": "upstream_error", "message": "boom"}})
    body = operator_client.get(reverse("admin:usage_admindebuglog_change", args=[log.pk])).content.decode()
    assert '<span class="aiw-error">upstream_error: boom</span>' in body


def test_every_agent_links_to_its_debug_tool_from_the_list_and_its_page(operator_client):
    agent = make_agent("writer")
    debug_url = reverse("admin:agents_agent_debug", args=[agent.pk])
    listing = operator_client.get(reverse("admin:agents_agent_changelist")).content.decode()
    assert f'href="{debug_url}"' in listing
    page = operator_client.get(reverse("admin:agents_agent_change", args=[agent.pk])).content.decode()
    assert f'<a href="{debug_url}" class="historylink" id="agent-debug-link">' in page


def test_wide_tables_keep_few_columns(operator_client, operator):
    _pages(operator)

    def columns(url):
        thead = operator_client.get(url).content.decode().split('<table id="result_list">')[1].split("</thead>")[0]
        return len(re.findall(r'<th scope="col"', thead)) - 1  # less the action checkbox

    assert columns(reverse("admin:usage_usagerecord_changelist")) <= 8
    assert columns(reverse("admin:agents_agent_changelist")) <= 6


def test_the_extra_stylesheet_is_on_every_admin_page(operator_client):
    for url in (reverse("admin:index"), reverse("admin:usage_usagerecord_changelist")):
        assert "css/admin-extra.css" in operator_client.get(url).content.decode()
