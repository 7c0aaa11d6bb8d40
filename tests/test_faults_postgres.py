"""PostgreSQL lost mid-request: the server reaches PostgreSQL through a TCP proxy of the test's, which
drops every connection and refuses new ones while the reply is being generated (a network partition or a
database restart, as the server sees it). The client gets 503 with `retryable: true`; money is never half-written
(the usage record and its charge are one transaction) and never forgotten: the call the upstream served is recorded
and charged, and its reply stored, by the server itself once the link is back; the next request works.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from decimal import Decimal

import pytest
from django.core.management import call_command
from django.db import connection

from conversations.models import Conversation, Message
from tests.factories import make_agent, make_api_key, make_fake_model
from tests.fixtures_faults import DatabaseLink, database_url_through
from tests.fixtures_openai import fund
from usage.models import CreditAccount, LedgerEntry, UsageRecord

pytestmark = [pytest.mark.pg, pytest.mark.django_db(transaction=True)]


def _post(url: str, body: dict, raw_key: str) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={
        "Authorization": f"Bearer {raw_key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_a_lost_database_connection_is_503_retryable_with_no_half_written_charge(daphne_processes, alice,
                                                                                  fake_upstream, assert_settled):
    model = make_fake_model(fake_upstream, "db-gpt", input_price="1", output_price="2")
    agent = make_agent("helper", model=model)
    fund(alice, "10")
    _, raw_key = make_api_key(alice)
    conversation = Conversation.objects.create(owner=alice, agent=agent)
    db = connection.settings_dict
    link = DatabaseLink(db["HOST"] or "127.0.0.1", int(db["PORT"] or 5432))
    # A request waits DB_POOL_TIMEOUT for a pooled connection before 503: short here, as the link stays cut.
    daphne = daphne_processes(DATABASE_URL=database_url_through(link), DB_POOL_TIMEOUT="2")
    fake_upstream.configure("db-gpt", latency=1.5)
    url = f"{daphne.base_url}/api/conversations/{conversation.pk}/messages/"

    result: list = []
    request = threading.Thread(target=lambda: result.append(_post(url, {"content": "hello"}, raw_key)))
    request.start()
    deadline = time.monotonic() + 20
    while not fake_upstream.requests:  # the server is waiting for the model, its connection open
        assert time.monotonic() < deadline and request.is_alive(), result
        time.sleep(0.02)
    try:
        assert link.cut() >= 1
        request.join(30)
    finally:
        link.restore()

    status, body = result[0]
    assert status == 503, body
    assert body["error"]["retryable"] is True and body["error"]["code"] == "database_unavailable"
    assert fake_upstream.completions == 1  # the upstream served the call while the database was away

    # No half-written money, and no free call: once the link is back, the server itself writes the record and
    # its charge (one transaction) and the reply's final state; reconcile with its defaults has nothing left.
    deadline = time.monotonic() + 15
    while UsageRecord.objects.count() < fake_upstream.completions or \
            Message.objects.filter(status=Message.Status.PROCESSING).exists():
        assert time.monotonic() < deadline, "the served call was never recorded"
        time.sleep(0.1)
    call_command("reconcile_reservations")
    record = UsageRecord.objects.get()
    assert record.charged and record.cost > 0 and UsageRecord.objects.count() == fake_upstream.completions
    assert LedgerEntry.objects.get(kind="charge").amount == -record.cost
    assert CreditAccount.objects.get(user=alice).balance == Decimal("10") - record.cost
    reply = Message.objects.get(conversation=conversation, role=Message.Role.ASSISTANT)
    assert reply.status == Message.Status.SUCCESS and reply.content and reply.cost == record.cost
    assert_settled()

    # The server reconnects by itself: the next request is served and charged normally.
    fake_upstream.configure("db-gpt", latency=0)
    status, body = _post(url, {"content": "hello again"}, raw_key)
    assert status == 201 and body["status"] == "success"
    assert UsageRecord.objects.filter(charged=True).count() == 2
    assert CreditAccount.objects.get(user=alice).balance < Decimal("10") - record.cost
    assert_settled()
    link.close()
