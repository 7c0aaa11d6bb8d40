"""Recovery from a PostgreSQL outage and from a server restart mid-reply, measured.

Live daphne processes with test settings: a generation's lease of 3 s (CONVERSATION_LOCK_SECONDS, renewed by its
heartbeat) and the in-process sweeper every second (SWEEPER_INTERVAL_SECONDS). No management command is run:
the server recovers by itself.

- Outage: the database link is cut for 5 s while three chats stream. Every socket gets exactly one final frame;
  once the link is back, the user's three conversations and a brand-new one answer within seconds; no reply
  stays `processing`, no hold stays held, and every call the upstream served has its record and its charge.
- Restart: the daphne process is killed mid-reply and a new one started; the conversation answers again within
  seconds, the dead reply ended and its hold settled.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from decimal import Decimal

import pytest
import websockets
from asgiref.sync import sync_to_async
from django.core.management import call_command
from django.db import connection, connections
from django.db.models import Sum

from conversations.models import Conversation, Message
from tests.factories import make_agent, make_api_key, make_fake_model
from tests.fixtures_faults import DatabaseLink, database_url_through
from tests.fixtures_openai import fund
from usage.models import CreditAccount, LedgerEntry, Reservation, UsageRecord

pytestmark = [pytest.mark.pg, pytest.mark.redis, pytest.mark.django_db(transaction=True)]

LEASE = "3"
RECOVERY_LIMIT = 10.0  # seconds from recovery to working conversations (docs/reliability.md has the measured figure)
SERVER_ENV = {"CONVERSATION_LOCK_SECONDS": LEASE, "SWEEPER_INTERVAL_SECONDS": "1"}


def _post(url: str, body: dict, raw_key: str) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={
        "Authorization": f"Bearer {raw_key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except OSError as exc:  # e.g. the server is not up yet
        return 0, {"error": str(exc)}


def _working_within(limit: float, attempts) -> float:
    """Seconds until every attempt (a callable giving an HTTP status) answers 201, retried; fails past `limit`."""
    started = time.monotonic()
    pending = list(attempts)
    last: dict = {}
    while pending:
        elapsed = time.monotonic() - started
        assert elapsed < limit, f"not working {elapsed:.1f}s after recovery: {last}"
        still = []
        for attempt in pending:
            status, body = attempt()
            if status != 201:
                last[id(attempt)] = (status, body.get("error", body))
                still.append(attempt)
        pending = still
        if pending:
            time.sleep(0.2)
    return time.monotonic() - started


async def _chat_until_final(ws_url: str, origin: str, raw_key: str, conversation_id: int, started: asyncio.Event,
                            frames: list) -> None:
    """One message; collects frames until the final one, then listens a little longer for a second."""
    headers = {"Origin": origin, "Authorization": f"Bearer {raw_key}"}
    async with websockets.connect(ws_url, additional_headers=headers, open_timeout=5) as socket:
        await socket.send(json.dumps({"type": "message", "conversation": conversation_id, "content": "Go on"}))
        async with asyncio.timeout(40):
            while True:
                frame = json.loads(await socket.recv())
                frames.append(frame)
                if frame["type"] == "delta":
                    started.set()
                if frame["type"] in ("done", "error"):
                    break
        try:
            async with asyncio.timeout(1.5):
                frames.append(json.loads(await socket.recv()))
        except TimeoutError:
            pass


def _money_is_exact(upstream_completions: int) -> None:
    """Usage rows == completions the upstream served; charges == those records' cost; nothing held."""
    assert UsageRecord.objects.count() == upstream_completions
    charged = UsageRecord.objects.filter(charged=True).aggregate(s=Sum("cost"))["s"] or Decimal(0)
    assert -(LedgerEntry.objects.filter(kind="charge").aggregate(s=Sum("amount"))["s"] or 0) == charged
    assert not Reservation.objects.filter(status=Reservation.Status.HELD).exists()
    assert not CreditAccount.objects.exclude(reserved=0).exists()


def test_after_a_database_outage_every_socket_has_its_final_frame_and_users_work_again_within_seconds(
        daphne_processes, alice, fake_upstream, assert_settled):
    model = make_fake_model(fake_upstream, "outage-gpt", input_price="1", output_price="2")
    agent = make_agent("helper", model=model)
    fund(alice, "10")
    _, raw_key = make_api_key(alice)
    conversations = [Conversation.objects.create(owner=alice, agent=agent) for _ in range(3)]
    db = connection.settings_dict
    link = DatabaseLink(db["HOST"] or "127.0.0.1", int(db["PORT"] or 5432))
    daphne = daphne_processes(DATABASE_URL=database_url_through(link), **SERVER_ENV)
    fake_upstream.configure("outage-gpt", tokens=40, chunk_delay=0.05)  # ~2 s of stream: it ends during the cut

    frames: list[list] = [[] for _ in conversations]

    async def outage() -> float:
        try:
            events = [asyncio.Event() for _ in conversations]
            chats = [asyncio.create_task(_chat_until_final(daphne.ws_url, daphne.base_url, raw_key, c.pk, e, f))
                     for c, e, f in zip(conversations, events, frames, strict=True)]
            async with asyncio.timeout(20):
                for event in events:
                    await event.wait()
            assert link.cut() >= 1
            await asyncio.sleep(5)
            link.restore()
            restored = time.monotonic()
            await asyncio.gather(*chats)
            return restored
        finally:
            await sync_to_async(connections.close_all)()

    try:
        restored = asyncio.run(outage())
    finally:
        link.restore()
    for got in frames:  # exactly one final frame per exchange, and it is the last frame
        finals = [f for f in got if f["type"] in ("done", "error")]
        assert len(finals) == 1 and got[-1] is finals[0], got
        assert finals[0]["type"] == "done" or finals[0]["retryable"] is True, finals[0]

    # From the link's return: the three conversations answer, and a brand-new one (the slots are free).
    fake_upstream.configure("outage-gpt", tokens=5, chunk_delay=0)
    base = f"{daphne.base_url}/api/conversations"
    attempts = [lambda c=c: _post(f"{base}/{c.pk}/messages/", {"content": "again"}, raw_key)[0:2]
                for c in conversations]

    def brand_new() -> tuple[int, dict]:
        status, body = _post(f"{base}/", {"agent": agent.slug, "new": True}, raw_key)
        if status not in (200, 201):
            return status, body
        return _post(f"{base}/{body['id']}/messages/", {"content": "hello"}, raw_key)

    waited = time.monotonic() - restored
    elapsed = waited + _working_within(RECOVERY_LIMIT - waited, [*attempts, brand_new])
    print(f"\nrecovery after the database outage: {elapsed:.1f}s to working conversations")  # docs/reliability.md
    assert elapsed <= RECOVERY_LIMIT

    assert_settled()
    assert not Message.objects.filter(status=Message.Status.PROCESSING).exists()
    call_command("reconcile_reservations")  # default arguments: nothing is released unbilled
    _money_is_exact(fake_upstream.completions)
    link.close()


def test_after_a_restart_mid_reply_the_conversation_works_again_within_seconds(daphne_processes, alice,
                                                                                fake_upstream, assert_settled):
    model = make_fake_model(fake_upstream, "restart-gpt", input_price="1", output_price="2")
    agent = make_agent("helper", model=model)
    fund(alice, "10")
    _, raw_key = make_api_key(alice)
    conversation = Conversation.objects.create(owner=alice, agent=agent)
    fake_upstream.configure("restart-gpt", tokens=400, chunk_delay=0.05)  # ~20 s of stream
    first = daphne_processes(**SERVER_ENV)

    async def start_reply() -> None:
        headers = {"Origin": first.base_url, "Authorization": f"Bearer {raw_key}"}
        try:
            socket = await websockets.connect(first.ws_url, additional_headers=headers, open_timeout=5)
            await socket.send(json.dumps({"type": "message", "conversation": conversation.pk, "content": "Go"}))
            async with asyncio.timeout(20):
                while json.loads(await socket.recv())["type"] != "delta":
                    pass
        finally:
            await sync_to_async(connections.close_all)()

    asyncio.run(start_reply())
    first.kill()  # a restart: the process dies mid-reply, no cleanup of any kind
    assert Message.objects.filter(status=Message.Status.PROCESSING, role=Message.Role.ASSISTANT).count() == 1

    second = daphne_processes(**SERVER_ENV)
    fake_upstream.configure("restart-gpt", tokens=5, chunk_delay=0)
    url = f"{second.base_url}/api/conversations/{conversation.pk}/messages/"
    elapsed = _working_within(RECOVERY_LIMIT, [lambda: _post(url, {"content": "again"}, raw_key)])
    print(f"\nrecovery after a restart mid-reply: {elapsed:.1f}s to a working conversation")  # docs/reliability.md
    assert elapsed <= RECOVERY_LIMIT

    dead = Message.objects.filter(conversation=conversation, role=Message.Role.ASSISTANT).order_by("sequence")[0]
    assert dead.status == Message.Status.ERROR and dead.error_code == "interrupted"
    assert_settled()  # its hold settled, nothing processing, no lock — without any management command
    assert UsageRecord.objects.get(message_id=dead.pk).error_code == "worker_lost"
