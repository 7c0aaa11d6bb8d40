"""Every message status is reachable (the API-level ones are in test_messages_api / test_chat_ws)."""

from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.utils import timezone

from conversations import locks, services
from conversations.models import Conversation, Message
from conversations.selectors import error_display

pytestmark = pytest.mark.django_db


def test_a_begun_exchange_is_pending_and_processing_until_it_ends(alice, chat_agent):
    conversation = Conversation.objects.create(owner=alice, agent=chat_agent)
    exchange = services.begin_exchange(user=alice, conversation=conversation, content="hello")
    try:
        assert exchange.user_message.status == "pending" and exchange.reply.status == "processing"
        assert locks.is_locked(conversation.pk, alice.pk)
        assert error_display(exchange.reply) is None
        services.finish_reply(exchange, status="success", content="hi", prompt_tokens=5, completion_tokens=2)
        # The first final state wins: a late cancel cannot turn a success into an error.
        services.finish_reply(exchange, status="error", content="")
    finally:
        services.release_lock(exchange)
    reply = Message.objects.get(pk=exchange.reply.pk)
    assert reply.status == "success" and reply.content == "hi"
    conversation.refresh_from_db()
    assert conversation.total_tokens == 7 and conversation.message_count == 2 and conversation.has_success
    assert not locks.is_locked(conversation.pk, alice.pk)


def test_the_sweeper_ends_stuck_replies_as_error_keeping_their_text(alice, chat_agent):
    conversation = Conversation.objects.create(owner=alice, agent=chat_agent)
    exchange = services.begin_exchange(user=alice, conversation=conversation, content="hello")
    services.save_partial(exchange.reply, "half a rep")
    fresh = services.begin_exchange(user=alice, conversation=Conversation.objects.create(
        owner=alice, agent=chat_agent, project="other"), content="hi")
    Message.objects.filter(pk=exchange.reply.pk).update(updated_at=timezone.now() - timedelta(hours=1))
    out = StringIO()
    call_command("sweep_stuck_messages", "--older-than", "600", stdout=out)
    assert "swept 1" in out.getvalue()
    reply = Message.objects.get(pk=exchange.reply.pk)
    assert reply.status == "error" and reply.content == "half a rep" and error_display(reply)
    assert Message.objects.get(pk=exchange.user_message.pk).status == "error"
    assert Message.objects.get(pk=fresh.reply.pk).status == "processing"  # still in progress: untouched
    call_command("sweep_stuck_messages", stdout=out)  # safe to run twice
    assert Message.objects.get(pk=exchange.reply.pk).status == "error"


def test_every_failed_status_has_an_error_display():
    for status in ("error", "insufficient_balance", "content_violation", "llm_error"):
        assert error_display(Message(status=status))
    for status in ("pending", "processing", "success"):
        assert error_display(Message(status=status)) is None


def test_every_final_status_is_reachable_through_the_api_with_its_error_display(alice, alice_client, chat_agent,
                                                                                fake_upstream, settings):
    from tests.factories import make_agent, make_fake_model

    settings.MODERATION_BLOCKLIST = ["forbidden"]
    cid = alice_client.post("/api/conversations/", {"agent": "helper"}, format="json").json()["id"]
    url = f"/api/conversations/{cid}/messages/"
    assert alice_client.post(url, {"content": "hello"}, format="json").status_code == 201
    assert alice_client.post(url, {"content": "forbidden words"}, format="json").status_code == 422
    fake_upstream.configure("chat-model", status=500)
    assert alice_client.post(url, {"content": "fails upstream"}, format="json").status_code == 502
    fake_upstream.reset()
    # `error`: a reply whose worker went away, ended by the sweeper.
    conversation = Conversation.objects.get(pk=cid)
    stuck = services.begin_exchange(user=alice, conversation=conversation, content="worker dies")
    locks.release(stuck.lock)
    Message.objects.filter(pk=stuck.reply.pk).update(updated_at=timezone.now() - timedelta(hours=1))
    call_command("sweep_stuck_messages", "--older-than", "60", stdout=StringIO())
    # `insufficient_balance`: a priced agent with no credit (another conversation).
    priced = make_agent("priced", model=make_fake_model(fake_upstream, "priced", input_price="1000",
                                                        output_price="1000"))
    pid = alice_client.post("/api/conversations/", {"agent": priced.slug}, format="json").json()["id"]
    assert alice_client.post(f"/api/conversations/{pid}/messages/", {"content": "hi"},
                             format="json").status_code == 402

    listed = alice_client.get(url).json()["results"] + alice_client.get(
        f"/api/conversations/{pid}/messages/").json()["results"]
    replies = {m["status"]: m for m in listed if m["role"] == "assistant"}
    assert set(replies) == {"success", "content_violation", "llm_error", "error", "insufficient_balance"}
    assert replies["success"]["error_display"] is None and replies["success"]["error_code"] == ""
    expected_codes = {"content_violation": "content_violation", "llm_error": "upstream_error",
                      "error": "interrupted", "insufficient_balance": "insufficient_balance"}
    for status, code in expected_codes.items():
        assert replies[status]["error_display"] == error_display(Message(status=status)), status
        assert replies[status]["error_code"] == code and replies[status]["error_message"], status
    # Every user message carries its reply's outcome; every lock is free again.
    users = {m["content"]: m["status"] for m in listed if m["role"] == "user"}
    assert users == {"hello": "success", "forbidden words": "content_violation", "fails upstream": "llm_error",
                     "worker dies": "error", "hi": "insufficient_balance"}
    assert not locks.is_locked(cid, alice.pk) and not locks.is_locked(pid, alice.pk)
    # Only the successful exchange added tokens; every message counted.
    conversation.refresh_from_db()
    assert conversation.message_count == 8 and conversation.total_tokens == replies["success"]["total_tokens"] > 0
