"""A daphne worker SIGKILLed mid-stream: nothing of it runs any cleanup.

Its conversation lock expires (CONVERSATION_LOCK_SECONDS), `manage.py sweep_stuck_messages` ends the
reply as `error` with the text that had arrived (checkpointed every few seconds while streaming), and
the call's credit hold gets its usage record — billed for that text as an estimate — with the rest released.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import websockets
from asgiref.sync import sync_to_async
from django.core.management import call_command
from django.db import connections
from rest_framework.test import APIClient

from conversations import locks
from conversations.models import Conversation, Message
from tests.factories import make_agent, make_api_key, make_fake_model
from tests.fixtures_openai import fund
from usage.models import CreditAccount, Reservation, UsageRecord

pytestmark = [pytest.mark.pg, pytest.mark.django_db(transaction=True)]

LOCK_SECONDS = 3


async def _stream_until_checkpointed(ws_url: str, origin: str, raw_key: str, conversation_id: int,
                                     reply_holder: list) -> str:
    """Sends a message, reads deltas until the reply's text is checkpointed in the database; returns what arrived."""
    headers = {"Origin": origin, "Authorization": f"Bearer {raw_key}"}
    socket = await websockets.connect(ws_url, additional_headers=headers, open_timeout=5)
    await socket.send(json.dumps({"type": "message", "conversation": conversation_id, "content": "Go on and on"}))
    received = []
    async with asyncio.timeout(30):
        while True:
            frame = json.loads(await socket.recv())
            assert frame["type"] != "done" and frame["type"] != "error", frame
            if frame["type"] == "delta":
                reply_holder[:] = [frame["message"]]
                received.append(frame["content"])
                saved = await Message.objects.filter(pk=frame["message"]).values_list("content", flat=True).aget()
                if len(saved) > 10:
                    return "".join(received)


def test_a_killed_worker_leaves_a_swept_reply_a_free_lock_and_a_settled_hold(daphne_processes, alice,
                                                                             fake_upstream, assert_settled):
    model = make_fake_model(fake_upstream, "slow-gpt", input_price="1", output_price="2")
    agent = make_agent("helper", model=model, system_prompt="Be long.")
    fund(alice, "10")
    _, raw_key = make_api_key(alice)
    conversation = Conversation.objects.create(owner=alice, agent=agent)
    fake_upstream.configure("slow-gpt", tokens=400, chunk_delay=0.05)  # ~20 s of stream
    daphne = daphne_processes(CONVERSATION_LOCK_SECONDS=str(LOCK_SECONDS))

    reply_id: list[int] = []
    async def stream() -> str:
        try:
            return await _stream_until_checkpointed(daphne.ws_url, daphne.base_url, raw_key, conversation.pk,
                                                    reply_id)
        finally:
            await sync_to_async(connections.close_all)()  # the ORM thread's connection, so the test DB can go

    received = asyncio.run(stream())
    daphne.kill()

    reply = Message.objects.get(pk=reply_id[0])
    assert reply.status == Message.Status.PROCESSING and received.startswith(reply.content)
    assert Reservation.objects.filter(status=Reservation.Status.HELD).count() == 1
    assert locks.is_locked(conversation.pk, alice.pk)  # nobody released it

    # The lock expires on its own; the sweeper ends the reply once it has been still that long.
    deadline = time.monotonic() + LOCK_SECONDS + 10
    while locks.is_locked(conversation.pk, alice.pk):
        assert time.monotonic() < deadline, "the dead worker's lock never expired"
        time.sleep(0.2)
    time.sleep(1)
    call_command("sweep_stuck_messages", older_than=LOCK_SECONDS)

    reply.refresh_from_db()
    assert reply.status == Message.Status.ERROR and reply.error_message
    assert reply.content and received.startswith(reply.content)  # what arrived, as far as it was saved
    assert reply.reply_to.status == Message.Status.ERROR
    record = UsageRecord.objects.get(message_id=reply.pk)
    assert record.status == UsageRecord.Status.ERROR and record.error_code == "worker_lost"
    assert record.token_source == UsageRecord.TokenSource.PARTIAL and record.charged and record.cost > 0
    assert reply.cost == record.cost and reply.usage_estimated
    account = CreditAccount.objects.get(user=alice)
    assert account.reserved == 0 and account.balance == 10 - record.cost
    assert_settled()

    # Sweeping again changes nothing; the conversation takes new messages.
    call_command("sweep_stuck_messages", older_than=LOCK_SECONDS)
    assert UsageRecord.objects.filter(message_id=reply.pk).count() == 1
    fake_upstream.configure("slow-gpt", tokens=5, chunk_delay=0)
    client = APIClient()
    client.force_authenticate(alice)
    response = client.post(f"/api/conversations/{conversation.pk}/messages/", {"content": "again"}, format="json")
    assert response.status_code == 201 and response.json()["status"] == "success"
    assert_settled()
