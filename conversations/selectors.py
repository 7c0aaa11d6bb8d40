"""Reads for conversations and messages. Every lookup is scoped to its owner: another user's id is 404."""

from __future__ import annotations

from django.db.models import Exists, OuterRef, Q, QuerySet

from aiwriter.errors import NotFound
from conversations.models import Conversation, Message

FAILED_STATUSES = frozenset({
    Message.Status.ERROR, Message.Status.INSUFFICIENT_BALANCE, Message.Status.CONTENT_VIOLATION,
    Message.Status.LLM_ERROR,
})

ERROR_DISPLAY = {
    Message.Status.ERROR: "The reply was interrupted before it was complete.",
    Message.Status.INSUFFICIENT_BALANCE: "Your credit balance or quota is too low for this reply. Top up to continue.",
    Message.Status.CONTENT_VIOLATION: "This message was blocked by content moderation.",
    Message.Status.LLM_ERROR: "The AI model failed to answer. Try again.",
}

# How many recent successful messages are considered for a prompt before trimming by tokens.
HISTORY_SCAN_LIMIT = 400


def error_display(message: Message) -> str | None:
    """A human sentence for a failed status (None for pending, processing and success)."""
    return ERROR_DISPLAY.get(message.status)


def conversations_of(user) -> QuerySet[Conversation]:
    return Conversation.objects.filter(owner=user, deleted_at__isnull=True)


def conversation_list(*, user, include_failed: bool = False, query: str = "") -> QuerySet[Conversation]:
    """Conversations with at least one successful reply (all of them with `include_failed`), newest first.

    `query` matches the title or any message's text (case-insensitive), within the user's own conversations.
    """
    qs = conversations_of(user)
    if not include_failed:
        qs = qs.filter(has_success=True)
    if query:
        in_messages = Message.objects.filter(conversation=OuterRef("pk"), content__icontains=query)
        qs = qs.filter(Q(title__icontains=query) | Exists(in_messages))
    return qs.select_related("agent").order_by("-updated_at", "-id")


def conversation_for(*, user, conversation_id) -> Conversation:
    try:
        conversation_id = int(conversation_id)
    except (TypeError, ValueError) as exc:
        raise NotFound("Conversation not found.") from exc
    conversation = conversations_of(user).select_related("agent").filter(pk=conversation_id).first()
    if conversation is None:
        raise NotFound("Conversation not found.")
    return conversation


def message_list(*, conversation: Conversation) -> QuerySet[Message]:
    return Message.objects.filter(conversation=conversation).order_by("sequence")


def message_for(*, conversation: Conversation, message_id) -> Message:
    try:
        message_id = int(message_id)
    except (TypeError, ValueError) as exc:
        raise NotFound("Message not found.") from exc
    message = Message.objects.filter(conversation=conversation, pk=message_id).first()
    if message is None:
        raise NotFound("Message not found.")
    return message


def reply_for_client_id(*, conversation: Conversation, client_id: str) -> Message | None:
    """The latest reply to the user message sent with this client_id, if any."""
    user_message = Message.objects.filter(conversation=conversation, client_id=client_id,
                                          role=Message.Role.USER).first()
    if user_message is None:
        return None
    return user_message.replies.order_by("-sequence").first()


def history_before(*, conversation: Conversation, sequence: int) -> list[Message]:
    """Successful user/assistant messages before `sequence`, newest first (trimmed by the caller)."""
    return list(
        Message.objects.filter(conversation=conversation, sequence__lt=sequence, status=Message.Status.SUCCESS,
                               role__in=[Message.Role.USER, Message.Role.ASSISTANT])
        .order_by("-sequence").only("role", "content", "sequence")[:HISTORY_SCAN_LIMIT]
    )
