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
