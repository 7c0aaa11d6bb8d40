"""PostgreSQL lost mid-request: the server reaches PostgreSQL through a TCP proxy of the test's, which
drops every connection and refuses new ones while the reply is being generated (a network partition or a
database restart, as the server sees it). The client gets 503 with `retryable: true`; money is never half-written
(the usage record and its charge are one transaction: neither exists), the hold is released by
`reconcile_reservations` and the reply ended by `sweep_stuck_messages`, and the next request works.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from decimal import Decimal
from urllib.parse import quote

import pytest
from django.core.management import call_command
from django.db import connection

from conversations.models import Conversation, Message
from tests.factories import make_agent, make_api_key, make_fake_model
from tests.fixtures_openai import fund
from usage.models import CreditAccount, LedgerEntry, Reservation, UsageRecord

pytestmark = [pytest.mark.pg, pytest.mark.django_db(transaction=True)]


def _post(url: str, body: dict, raw_key: str) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={
        "Authorization": f"Bearer {raw_key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


class DatabaseLink:
    """A TCP proxy to PostgreSQL that can be cut (open connections reset, new ones refused) and restored."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.up = True
        self.open: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            upstream = socket.create_connection(self.target)
            with self.lock:
                self.open += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> int:
        self.up = False
        with self.lock:
            dropped, self.open = self.open, []
        for sock in dropped:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return len(dropped) // 2

    def restore(self) -> None:
        self.up = True

    def close(self) -> None:
        self.listener.close()
        self.cut()


def _url_through(link: DatabaseLink) -> str:
    db = connection.settings_dict
    return f"postgres://{quote(db['USER'] or '', safe='')}@127.0.0.1:{link.port}/{db['NAME']}"


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
    daphne = daphne_processes(DATABASE_URL=_url_through(link), DB_POOL_TIMEOUT="2")
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
    # No half-written money: no record, no ledger entry, balance untouched; the hold waits for reconcile.
    assert not UsageRecord.objects.exists() and not LedgerEntry.objects.filter(kind="charge").exists()
    assert CreditAccount.objects.get(user=alice).balance == Decimal("10")
    assert Reservation.objects.filter(status=Reservation.Status.HELD).count() == 1

    call_command("reconcile_reservations", older_than=0)
    call_command("sweep_stuck_messages", older_than=0)
    reply = Message.objects.get(conversation=conversation, role=Message.Role.ASSISTANT)
    assert reply.status == Message.Status.ERROR
    assert_settled()

    # The server reconnects by itself: the next request is served and charged normally.
    fake_upstream.configure("db-gpt", latency=0)
    status, body = _post(url, {"content": "hello again"}, raw_key)
    assert status == 201 and body["status"] == "success"
    assert UsageRecord.objects.filter(charged=True).count() == 1
    assert CreditAccount.objects.get(user=alice).balance < Decimal("10")
    assert_settled()
    link.close()
