"""Writes for conversations and messages: create (deduplicated), exchanges, final states, retry, sweeping.

An exchange is one user message and its assistant reply. `begin_exchange` stores both (the user message
before the model is ever called) under the conversation's lock; `conversations.generation.run_exchange`
calls the model and `finish_reply` writes the outcome. Every failed outcome keeps the text that arrived.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal
from typing import Any

from asgiref.sync import async_to_sync
from django.conf import settings
from django.core.cache import cache
from django.db import connection, transaction
from django.db.models import F
from django.utils import timezone

from agents.llm import tokens
from agents.models import Agent
from aiwriter.errors import ApiError
from conversations import locks, moderation, selectors, sequence
from conversations.models import Conversation, GenerationLease, Message
from usage import keylimits
from usage.billing.reconcile import settle_abandoned_calls
from usage.models import ApiKey

logger = logging.getLogger(__name__)

TITLE_CHARS = 80
_dedupe_guard = threading.Lock()  # SQLite fallback only: PostgreSQL holds the guarantee across processes


class UnknownAgent(ApiError):
    code = "unknown_agent"
    message = "No enabled agent with that slug."


class NotRetryable(ApiError):
    status_code = 409
    code = "not_retryable"
    message = "Only a failed reply that has not been answered since can be retried."


class MessageTooLong(ApiError):
    status_code = 413
    code = "message_too_long"


@dataclass
class Exchange:
    conversation: Conversation
    user_message: Message
    reply: Message
    lock: locks.GenerationLock | None = None  # held while the reply is generated
    replay: bool = False  # an earlier request with the same client_id: its reply, nothing new
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.lock is None


# --- conversations -------------------------------------------------------------------------------

def resolve_agent(slug_or_id: Any) -> Agent:
    qs = Agent.objects.filter(enabled=True).select_related("model", "fallback_model")
    agent = None
    if isinstance(slug_or_id, str) and slug_or_id:
        agent = qs.filter(slug=slug_or_id).first()
    if agent is None and (isinstance(slug_or_id, int) or (isinstance(slug_or_id, str) and slug_or_id.isdigit())):
        agent = qs.filter(pk=int(slug_or_id)).first()
    if agent is None:
        raise UnknownAgent()
    return agent


def check_key_access(api_key: Any, agent: Agent) -> None:
    """An API key limited to some models may only chat with agents whose model is one of them (as on /v1).

    Unknown to the key reads as unknown at all, so a key cannot probe for agents it may not use.
    """
    if not key_allows_model(api_key, agent.model_id):
        raise UnknownAgent()


def key_allows_model(api_key: Any, model_id: int) -> bool:
    """True unless the API key is limited to some models and this is not one of them."""
    if api_key is None or getattr(api_key, "pk", None) is None:
        return True
    links = ApiKey.allowed_models.through.objects.filter(apikey_id=api_key.pk)
    return not links.exists() or links.filter(llmmodel_id=model_id).exists()


def _dedupe_cache_key(user_id: int, agent_id: int, project: str) -> str:
    digest = hashlib.sha256(project.encode()).hexdigest()[:16]
    return f"conv:dedupe:{user_id}:{agent_id}:{digest}"


def _recent(user, agent: Agent, project: str):
    since = timezone.now() - timedelta(seconds=settings.CONVERSATION_DEDUPE_SECONDS)
    return Conversation.objects.filter(owner=user, agent=agent, project=project, deleted_at__isnull=True,
                                       created_at__gte=since)


def create_conversation(*, user, agent: Agent, project: str = "", title: str = "", api_key: Any = None,
                        new: bool = False, client_id: str | None = None) -> tuple[Conversation, bool]:
    """The user's conversation with this agent and project from the last 5 minutes, or a new one.

    Returns (conversation, created). Redis (the cache) is only a fast path; the guarantee that 100
    identical concurrent requests make one row is a per-user PostgreSQL advisory lock around the
    check-then-insert.

    `new` skips the dedupe: always a new conversation (which later deduplicated creates then find) —
    except that a `client_id` already sent to one of those recent conversations finds that one, so a
    message frame re-sent after a reconnect replays instead of starting a second conversation.
    """
    check_key_access(api_key, agent)
    key = _dedupe_cache_key(user.pk, agent.pk, project)
    cached_id = None if new else cache.get(key)
    if cached_id:
        existing = _recent(user, agent, project).filter(pk=cached_id).first()
        if existing is not None:
            return existing, False
    with (nullcontext() if settings.IS_POSTGRES else _dedupe_guard), transaction.atomic():
        if settings.IS_POSTGRES:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_xact_lock(%s, %s)", [locks.ADVISORY_DEDUPE, user.pk])
        if not new:
            existing = _recent(user, agent, project).order_by("-created_at").first()
        elif client_id:
            existing = _recent(user, agent, project).filter(messages__client_id=client_id).first()
        else:
            existing = None
        if existing is not None:
            conversation, created = existing, False
        else:
            conversation = Conversation.objects.create(owner=user, agent=agent, project=project, title=title)
            created = True
    if created or not new:
        cache.set(key, conversation.pk, timeout=settings.CONVERSATION_DEDUPE_SECONDS)
    return conversation, created


def update_conversation(*, conversation: Conversation, title: str | None = None) -> Conversation:
    if title is not None:
        conversation.title = title[:200]
        conversation.save(update_fields=["title", "updated_at"])
    return conversation


def delete_conversation(*, conversation: Conversation) -> None:
    """Soft delete: hidden everywhere, kept for usage records and audits."""
    conversation.deleted_at = timezone.now()
    conversation.save(update_fields=["deleted_at", "updated_at"])
    cache.delete(_dedupe_cache_key(conversation.owner_id, conversation.agent_id, conversation.project))


# --- exchanges ------------------------------------------------------------------------------------

def _validate_content(content: Any) -> str:
    if not isinstance(content, str) or not content.strip():
        raise ApiError("`content` must be a non-empty string.", code="bad_request")
    if len(content) > settings.MAX_MESSAGE_CHARS:
        raise MessageTooLong(f"A message may have at most {settings.MAX_MESSAGE_CHARS} characters.")
    return content


def key_rate_request(api_key: Any, content: str, agent: Agent) -> tuple[int, int | None] | None:
    """What a message asks of its API key's per-minute limits: (prompt tokens, max output), None without limits.

    The new message's tokens stand for the prompt, and the agent's maximum output is held with them, so
    concurrent messages see each other; the reply's real usage replaces the hold when it ends
    (`generation.run_exchange`). A session has no key and no such limit.
    """
    if not (getattr(api_key, "rpm", None) or getattr(api_key, "tpm", None)):
        return None
    prompt_tokens = tokens.count_messages([{"role": "user", "content": content}]) if api_key.tpm else 0
    max_output = None
    if api_key.tpm:  # the agent's max_tokens at most the model's cap, as the reply's request gets it
        cap, wanted = agent.model.max_output_tokens, agent.max_tokens
        max_output = (min(wanted, cap) if wanted and cap else wanted or cap) or None
    return prompt_tokens, max_output


def _check_key_rate(api_key: Any, content: str, agent: Agent) -> keylimits.Hold | None:
    """The API key's requests and tokens per minute, as on /v1 and the writer endpoints (shared counters).
    Raises KeyRateLimited (429)."""
    wanted = key_rate_request(api_key, content, agent)
    if wanted is None:
        return None
    return async_to_sync(keylimits.acquire)(api_key, prompt_tokens=wanted[0], max_output_tokens=wanted[1])


def _release_key_hold(hold: keylimits.Hold | None) -> None:
    """No model call will follow (refused, moderated or failed before storing): the hold used no tokens."""
    if hold is not None:
        async_to_sync(keylimits.settle)(hold, 0)


def _replay(conversation: Conversation, client_id: str | None) -> Exchange | None:
    if not client_id:
        return None
    reply = selectors.reply_for_client_id(conversation=conversation, client_id=client_id)
    if reply is None:
        return None
    if reply.status in (Message.Status.PROCESSING, Message.Status.PENDING):
        raise locks.ConversationBusy("The message with this client_id is still being answered.")
    return Exchange(conversation=conversation, user_message=reply.reply_to, reply=reply, replay=True)


def begin_exchange(*, user, conversation: Conversation, content: Any, client_id: str | None = None,
                   api_key: Any = None) -> Exchange:
    """Stores the user message and a `processing` reply under the conversation's lock.

    Raises ConversationBusy (409) / TooManyConcurrent (429), or KeyRateLimited (429) for an API key over its
    rate limits, before anything is stored. A repeated client_id returns the first exchange (replay)
    instead, not counted against those limits. Moderation runs here: a rejected message ends as
    `content_violation` without a lock held and without any model call.
    """
    check_key_access(api_key, conversation.agent)
    content = _validate_content(content)
    client_id = (client_id or None) and str(client_id)[:64]
    replay = _replay(conversation, client_id)
    if replay is not None:
        return replay
    lock = locks.acquire(owner_id=user.pk, conversation_id=conversation.pk)
    try:
        # Its lock expired, so a reply still `processing` here lost its generation (a dead worker): end it now.
        sweep_stuck_messages(older_than_seconds=settings.CONVERSATION_LOCK_SECONDS, conversation_id=conversation.pk)
        replay = _replay(conversation, client_id)  # a twin request may have finished while we waited
        if replay is not None:
            locks.release(lock)
            return replay
        hold = _check_key_rate(api_key, content, conversation.agent)

        try:
            user_message, reply = sequence.insert_with_sequence(
                conversation.pk, 2, lambda numbers: insert_exchange(conversation, content, client_id, numbers))
        except BaseException:
            _release_key_hold(hold)
            raise
        exchange = Exchange(conversation=conversation, user_message=user_message, reply=reply, lock=lock,
                            extra={"key_hold": hold})
        _moderate(exchange)
        return exchange
    except BaseException:
        locks.release(lock)
        raise


def new_exchange_messages(conversation: Conversation, content: str, client_id: str | None,
                          numbers: list[int]) -> tuple[Message, Message]:
    """The user message (`pending`) and its reply (`processing`) of a new exchange, unsaved."""
    user_message = Message(conversation=conversation, role=Message.Role.USER, content=content,
                           status=Message.Status.PENDING, sequence=numbers[0], client_id=client_id)
    reply = Message(conversation=conversation, role=Message.Role.ASSISTANT, status=Message.Status.PROCESSING,
                    sequence=numbers[1], reply_to=user_message)
    return user_message, reply


def insert_exchange(conversation: Conversation, content: str, client_id: str | None,
                    numbers: list[int]) -> tuple[Message, Message]:
    """Stores a new exchange's two messages and counts them (call in a transaction: sequence.insert_with_sequence)."""
    user_message, reply = new_exchange_messages(conversation, content, client_id, numbers)
    user_message.save(force_insert=True)
    reply.reply_to = user_message  # its id is known now
    reply.save(force_insert=True)
    _count_messages(conversation, 2, title_from=content)
    return user_message, reply


def title_for(content: str) -> str:
    """A conversation's title from its first message."""
    return " ".join(content.split())[:TITLE_CHARS]


def begin_retry(*, user, conversation: Conversation, message: Message, api_key: Any = None) -> Exchange:
    """A new reply to the user message whose reply `message` failed; the failed one is kept as it was.

    An API key's rate limits apply as to a new message (KeyRateLimited before anything is stored)."""
    check_key_access(api_key, conversation.agent)
    if message.role != Message.Role.ASSISTANT or message.status not in selectors.FAILED_STATUSES \
            or message.reply_to_id is None:
        raise NotRetryable()
    lock = locks.acquire(owner_id=user.pk, conversation_id=conversation.pk)
    try:
        user_message = Message.objects.get(pk=message.reply_to_id)
        newer = user_message.replies.filter(sequence__gt=message.sequence).exists()
        if newer or user_message.status == Message.Status.SUCCESS:
            raise NotRetryable()
        hold = _check_key_rate(api_key, user_message.content, conversation.agent)

        def insert(numbers: list[int]) -> Message:
            reply = Message.objects.create(
                conversation=conversation, role=Message.Role.ASSISTANT, status=Message.Status.PROCESSING,
                sequence=numbers[0], reply_to=user_message)
            Message.objects.filter(pk=user_message.pk).update(status=Message.Status.PENDING, error_message="",
                                                              updated_at=timezone.now())
            _count_messages(conversation, 1)
            return reply

        try:
            reply = sequence.insert_with_sequence(conversation.pk, 1, insert)
        except BaseException:
            _release_key_hold(hold)
            raise
        user_message.refresh_from_db()
        exchange = Exchange(conversation=conversation, user_message=user_message, reply=reply, lock=lock,
                            extra={"key_hold": hold})
        _moderate(exchange)
        return exchange
    except BaseException:
        locks.release(lock)
        raise


def _count_messages(conversation: Conversation, added: int, title_from: str = "") -> None:
    """Every message counts in message_count (only successful replies add tokens, in finish_reply)."""
    updates: dict[str, Any] = {"message_count": F("message_count") + added, "updated_at": timezone.now()}
    Conversation.objects.filter(pk=conversation.pk).update(**updates)
    if title_from and not conversation.title:
        title = title_for(title_from)
        Conversation.objects.filter(pk=conversation.pk, title="").update(title=title)
        conversation.title = title
    conversation.message_count += added


def _moderate(exchange: Exchange) -> None:
    reason = moderation.check(exchange.user_message.content)
    if reason is None:
        return
    finish_reply(exchange, status=Message.Status.CONTENT_VIOLATION, error_message=reason,
                 error_code="content_violation")
    locks.release(exchange.lock)
    exchange.lock = None
    _release_key_hold(exchange.extra.get("key_hold"))


def finish_reply(exchange: Exchange, *, status: str, content: str = "", error_message: str = "",
                 error_code: str = "", model_name: str = "", provider_name: str = "", prompt_tokens: int = 0,
                 completion_tokens: int = 0, usage_estimated: bool = False, fallback: bool = False,
                 latency_ms: int | None = None, cost: Decimal = Decimal("0")) -> Message:
    """Writes a reply's final state, its user message's status and the conversation's counters, atomically.

    Only a reply still `processing` changes: the first final state wins (a late cancel, the sweeper).
    """
    now = timezone.now()
    reply = exchange.reply
    values: dict[str, Any] = dict(
        status=status, content=content, error_message=error_message, error_code=error_code[:50],
        model_name=model_name[:100],
        provider_name=provider_name[:100], prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
        usage_estimated=usage_estimated, fallback=fallback, latency_ms=latency_ms, cost=cost)
    with transaction.atomic():
        changed = Message.objects.filter(pk=reply.pk, status=Message.Status.PROCESSING).update(
            updated_at=now, **values)
        if not changed:
            reply.refresh_from_db()
            return reply
        for name, value in values.items():
            setattr(reply, name, value)
        reply.updated_at = now
        # The user message shares the outcome, so failed exchanges stay out of later prompts.
        Message.objects.filter(pk=exchange.user_message.pk).update(status=status, updated_at=now)
        exchange.user_message.status = status
        updates: dict[str, Any] = {"updated_at": now}
        if status == Message.Status.SUCCESS:
            updates.update(total_tokens=F("total_tokens") + prompt_tokens + completion_tokens, has_success=True)
        Conversation.objects.filter(pk=exchange.conversation.pk).update(**updates)
    return reply


def save_partial(reply: Message, content: str) -> None:
    """Checkpoints streamed text, so a crashed worker's reply keeps what arrived (the sweeper ends it)."""
    Message.objects.filter(pk=reply.pk, status=Message.Status.PROCESSING).update(content=content,
                                                                                   updated_at=timezone.now())


def checkpoint(exchange: Exchange, content: str) -> None:
    """The generation's heartbeat: renews its lock (Redis or lease row, never raises) and saves the text so far,
    which also touches the reply (`updated_at`: how the sweeper tells a live generation from a dead one)."""
    if exchange.lock is not None:
        locks.extend(exchange.lock)
    save_partial(exchange.reply, content)


def release_lock(exchange: Exchange) -> None:
    if exchange.lock is not None:
        locks.release(exchange.lock)
        exchange.lock = None


# --- housekeeping ---------------------------------------------------------------------------------

def _settle_swept_call(reply: Message) -> None:
    """The dead worker's credit hold: billed for the text that arrived (an estimate), the rest released."""
    model = reply.conversation.agent.model.name
    question = reply.reply_to.content if reply.reply_to else ""
    prompt_tokens = tokens.count_messages([{"role": "user", "content": question}], model)
    records = settle_abandoned_calls(message_id=reply.pk, prompt_tokens=prompt_tokens, delivered=reply.content)
    if records:
        record = records[-1]
        Message.objects.filter(pk=reply.pk).update(prompt_tokens=record.prompt_tokens,
                                                   completion_tokens=record.completion_tokens,
                                                   usage_estimated=True, cost=record.cost if record.charged else 0)


def sweep_stuck_messages(*, older_than_seconds: float, conversation_id: int | None = None,
                         only_unlocked: bool = False) -> int:
    """Ends replies stuck in `processing` with no progress for `older_than_seconds` as `error` (text kept).

    A live generation touches its reply every few seconds (the heartbeat), so one still for longer than the lease
    is dead. `only_unlocked` (the background sweeper) also spares a reply whose conversation lock is still renewed
    (its generation is alive but could not reach the database) or whose final write this process still retries.
    """
    from aiwriter import deferred

    cutoff = timezone.now() - timedelta(seconds=older_than_seconds)
    swept = 0
    stuck = Message.objects.filter(role=Message.Role.ASSISTANT, status=Message.Status.PROCESSING,
                                   updated_at__lt=cutoff).select_related("conversation__agent__model", "reply_to")
    if conversation_id is not None:
        stuck = stuck.filter(conversation_id=conversation_id)
    for reply in stuck.iterator():
        if only_unlocked and (deferred.is_pending(f"reply:{reply.pk}")
                              or locks.is_locked(reply.conversation_id, reply.conversation.owner_id)):
            continue
        with transaction.atomic():
            changed = Message.objects.filter(pk=reply.pk, status=Message.Status.PROCESSING,
                                             updated_at__lt=cutoff).update(
                status=Message.Status.ERROR, error_message="The reply stopped: its worker went away.",
                error_code="interrupted", updated_at=timezone.now())
            if changed and reply.reply_to_id:
                Message.objects.filter(pk=reply.reply_to_id, status=Message.Status.PENDING).update(
                    status=Message.Status.ERROR, updated_at=timezone.now())
            swept += changed
        if changed:
            _settle_swept_call(reply)
    if conversation_id is None:
        GenerationLease.objects.filter(expires_at__lte=timezone.now()).delete()
    return swept
