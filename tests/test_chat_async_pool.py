"""A chat turn's final state on the async pool (conversations.hotpath) writes what the sync finish_reply writes.

Two identical exchanges, one ended by services.finish_reply (the ORM, as on SQLite), one by the one-statement
hotpath.finish_reply on the pool: the reply, its user message and the conversation's counters must match. The
first final state still wins on the pool (a late cancel cannot overwrite a success).
"""

from decimal import Decimal

import pytest
from asgiref.sync import sync_to_async

from aiwriter import dbpool
from conversations import hotpath, locks, services
from conversations.models import Conversation, GenerationLease, Message
from tests.factories import make_agent, make_model, make_user

pytestmark = [pytest.mark.pg, pytest.mark.django_db(transaction=True),
              pytest.mark.usefixtures("close_thread_connections")]

REPLY_FIELDS = ["status", "content", "error_message", "error_code", "model_name", "provider_name", "prompt_tokens",
                "completion_tokens", "usage_estimated", "fallback", "latency_ms", "cost", "role", "sequence"]


def _exchange(agent, name: str) -> services.Exchange:
    user = make_user(name)
    conversation = Conversation.objects.create(owner=user, agent=agent)
    return services.begin_exchange(user=user, conversation=conversation, content="hello there")


def _state(exchange: services.Exchange) -> dict:
    reply = Message.objects.get(pk=exchange.reply.pk)
    question = Message.objects.get(pk=exchange.user_message.pk)
    conversation = Conversation.objects.get(pk=exchange.conversation.pk)
    return {"reply": {f: getattr(reply, f) for f in REPLY_FIELDS}, "question": (question.status, question.content),
            "conversation": (conversation.message_count, conversation.total_tokens, conversation.has_success,
                             conversation.title)}


FIELDS = {
    "success": dict(status="success", content="The sea is wide.", model_name="m" * 120, provider_name="p",
                    prompt_tokens=11, completion_tokens=5, usage_estimated=False, fallback=True, latency_ms=42,
                    cost=Decimal("0.0001234567")),
    "llm_error": dict(status="llm_error", content="The sea", error_message="upstream failed",
                      error_code="upstream_timeout", prompt_tokens=11, completion_tokens=2, usage_estimated=True,
                      latency_ms=None),
}


@pytest.mark.parametrize("outcome", list(FIELDS))
async def test_both_paths_end_a_reply_with_the_same_rows(outcome):
    agent = await sync_to_async(make_agent)(model=await sync_to_async(make_model)())
    by_orm = await sync_to_async(_exchange)(agent, "orm")
    by_pool = await sync_to_async(_exchange)(agent, "pool")
    try:
        await sync_to_async(services.finish_reply)(by_orm, **FIELDS[outcome])
        pool = await dbpool.get_pool()
        before = pool.get_stats().get("requests_num", 0)
        reply = await hotpath.finish_reply(by_pool, **FIELDS[outcome])
        assert pool.get_stats().get("requests_num", 0) - before == 1  # one statement, on the pool
    finally:
        await sync_to_async(services.release_lock)(by_orm)
        await sync_to_async(services.release_lock)(by_pool)
    orm_state, pool_state = await sync_to_async(_state)(by_orm), await sync_to_async(_state)(by_pool)
    assert pool_state == orm_state
    assert reply.status == outcome and by_pool.user_message.status == outcome
    assert {f: getattr(reply, f) for f in REPLY_FIELDS if f not in ("role", "sequence")} == \
        {f: v for f, v in orm_state["reply"].items() if f not in ("role", "sequence")}


async def test_the_first_final_state_wins_on_the_pool():
    agent = await sync_to_async(make_agent)(model=await sync_to_async(make_model)())
    exchange = await sync_to_async(_exchange)(agent, "late")
    try:
        await hotpath.finish_reply(exchange, **FIELDS["success"])
        reply = await hotpath.finish_reply(exchange, status="error", content="", error_code="cancelled")
    finally:
        await sync_to_async(services.release_lock)(exchange)
    assert reply.status == "success" and reply.content == "The sea is wide."
    state = await sync_to_async(_state)(exchange)
    assert state["reply"]["status"] == "success" and state["question"][0] == "success"
    assert state["conversation"][1] == 16  # counted once


@pytest.mark.redis
async def test_the_lock_is_released_without_a_thread_hop_on_redis_and_on_a_lease():
    agent = await sync_to_async(make_agent)(model=await sync_to_async(make_model)())
    exchange = await sync_to_async(_exchange)(agent, "locker")
    assert exchange.lock.backend == "redis"
    conversation, owner = exchange.conversation.pk, exchange.conversation.owner_id
    assert await sync_to_async(locks.is_locked)(conversation, owner)
    await hotpath.finish_reply(exchange, **FIELDS["success"])
    await hotpath.release_lock(exchange)
    assert exchange.lock is None and not await sync_to_async(locks.is_locked)(conversation, owner)

    # The database lease (Redis down or absent): the row goes, on the pool.
    lease = await sync_to_async(locks._acquire_db)(owner, conversation, "tok")
    exchange.lock = lease
    assert await sync_to_async(GenerationLease.objects.filter(conversation_id=conversation).exists)()
    await hotpath.release_lock(exchange)
    assert not await sync_to_async(GenerationLease.objects.filter(conversation_id=conversation).exists)()
    # Someone else's lease (another token) is never released by the old holder.
    other = await sync_to_async(locks._acquire_db)(owner, conversation, "theirs")
    exchange.lock = locks.GenerationLock(conversation, owner, "tok", "db")
    await hotpath.release_lock(exchange)
    assert await sync_to_async(GenerationLease.objects.filter(conversation_id=conversation, token="theirs").exists)()
    await sync_to_async(locks.release)(other)
