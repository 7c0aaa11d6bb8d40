"""One generation per conversation and at most MAX_CONCURRENT_CONVERSATIONS per user, across processes."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from django.db import connections
from rest_framework.test import APIClient

from aiwriter import redis as shared_redis
from conversations import locks
from conversations.models import Conversation, GenerationLease


def _conversations(owner, agent, n):
    return [Conversation.objects.create(owner=owner, agent=agent, project=f"p{i}") for i in range(n)]


def _lock_rules_hold(alice, chat_agent, expected_backend):
    c1, c2, c3, c4 = _conversations(alice, chat_agent, 4)
    held = locks.acquire(owner_id=alice.pk, conversation_id=c1.pk)
    assert held.backend == expected_backend
    with pytest.raises(locks.ConversationBusy):
        locks.acquire(owner_id=alice.pk, conversation_id=c1.pk)
    others = [locks.acquire(owner_id=alice.pk, conversation_id=c.pk) for c in (c2, c3)]
    with pytest.raises(locks.TooManyConcurrent):
        locks.acquire(owner_id=alice.pk, conversation_id=c4.pk)
    # Compare-and-delete: a stale holder (wrong token) cannot release someone else's lock.
    assert not locks.release(locks.GenerationLock(c1.pk, alice.pk, "not-the-token", held.backend))
    assert locks.is_locked(c1.pk, alice.pk)
    assert held.release() and not locks.is_locked(c1.pk, alice.pk)
    locks.acquire(owner_id=alice.pk, conversation_id=c4.pk).release()
    for lock in others:
        lock.release()


@pytest.mark.redis
@pytest.mark.django_db
def test_redis_lock_and_per_user_limit(alice, chat_agent):
    _lock_rules_hold(alice, chat_agent, "redis")


@pytest.mark.django_db
def test_database_lock_and_per_user_limit_without_redis(alice, chat_agent, no_redis):
    _lock_rules_hold(alice, chat_agent, "db")


@pytest.mark.django_db
def test_unreachable_redis_falls_back_to_the_database(alice, chat_agent, settings):
    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    shared_redis.get_redis.cache_clear()
    try:
        _lock_rules_hold(alice, chat_agent, "db")
    finally:
        shared_redis.get_redis.cache_clear()


@pytest.mark.redis
@pytest.mark.django_db
def test_a_crashed_holders_lock_expires(alice, chat_agent, settings):
    settings.CONVERSATION_LOCK_SECONDS = 1
    (conversation,) = _conversations(alice, chat_agent, 1)
    locks.acquire(owner_id=alice.pk, conversation_id=conversation.pk)  # never released
    time.sleep(1.1)
    locks.acquire(owner_id=alice.pk, conversation_id=conversation.pk).release()


@pytest.mark.django_db
def test_a_crashed_holders_lease_expires_without_redis(alice, chat_agent, no_redis):
    (conversation,) = _conversations(alice, chat_agent, 1)
    locks.acquire(owner_id=alice.pk, conversation_id=conversation.pk)
    GenerationLease.objects.update(expires_at="2000-01-01T00:00:00Z")
    locks.acquire(owner_id=alice.pk, conversation_id=conversation.pk).release()


def _post_all(user, urls, contents) -> list:
    """POSTs to every url at the same moment, one thread each; returns the responses in order."""
    barrier = threading.Barrier(len(urls))

    def post(i):
        client = APIClient()
        client.force_authenticate(user)
        try:
            barrier.wait(timeout=10)
            return client.post(urls[i], {"content": contents[i]}, format="json")
        finally:
            connections.close_all()

    with ThreadPoolExecutor(len(urls)) as pool:
        return list(pool.map(post, range(len(urls))))


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
def test_concurrent_posts_to_one_conversation_get_409_conversation_busy(alice, chat_agent, fake_upstream):
    fake_upstream.configure("chat-model", latency=0.5)
    (conversation,) = _conversations(alice, chat_agent, 1)
    url = f"/api/conversations/{conversation.pk}/messages/"
    responses = _post_all(alice, [url] * 6, [f"q{i}" for i in range(6)])
    codes = sorted(r.status_code for r in responses)
    assert codes == [201, 409, 409, 409, 409, 409]
    busy = next(r for r in responses if r.status_code == 409).json()["error"]
    assert busy == {"code": "conversation_busy", "message": busy["message"], "retryable": True}
    assert len(fake_upstream.requests) == 1
    assert not locks.is_locked(conversation.pk, alice.pk)


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
def test_the_fourth_concurrent_conversation_is_refused(alice, chat_agent, fake_upstream):
    fake_upstream.configure("chat-model", latency=0.5)
    conversations = _conversations(alice, chat_agent, 4)
    urls = [f"/api/conversations/{c.pk}/messages/" for c in conversations]
    responses = _post_all(alice, urls, ["q"] * 4)
    codes = sorted(r.status_code for r in responses)
    assert codes == [201, 201, 201, 429]
    assert next(r for r in responses if r.status_code == 429).json()["error"]["code"] == "too_many_concurrent"
    # Slots are given back: all four conversations are free again.
    assert not any(locks.is_locked(c.pk, alice.pk) for c in conversations)


@pytest.mark.pg
@pytest.mark.django_db(transaction=True)
def test_the_fourth_concurrent_conversation_is_refused_by_postgresql_without_redis(alice, chat_agent, fake_upstream,
                                                                                   no_redis):
    fake_upstream.configure("chat-model", latency=0.5)
    conversations = _conversations(alice, chat_agent, 4)
    urls = [f"/api/conversations/{c.pk}/messages/" for c in conversations]
    codes = sorted(r.status_code for r in _post_all(alice, urls, ["q"] * 4))
    assert codes == [201, 201, 201, 429]
    assert GenerationLease.objects.count() == 0


@pytest.mark.redis
@pytest.mark.django_db
def test_extend_keeps_a_long_generations_lock(alice, chat_agent, settings):
    settings.CONVERSATION_LOCK_SECONDS = 1
    (conversation,) = _conversations(alice, chat_agent, 1)
    lock = locks.acquire(owner_id=alice.pk, conversation_id=conversation.pk)
    time.sleep(0.6)
    assert locks.extend(lock)
    time.sleep(0.6)
    with pytest.raises(locks.ConversationBusy):
        locks.acquire(owner_id=alice.pk, conversation_id=conversation.pk)
    assert not locks.extend(locks.GenerationLock(conversation.pk, alice.pk, "stale", "redis"))
    lock.release()


@pytest.mark.django_db
def test_extend_without_redis(alice, chat_agent, no_redis):
    (conversation,) = _conversations(alice, chat_agent, 1)
    lock = locks.acquire(owner_id=alice.pk, conversation_id=conversation.pk)
    before = GenerationLease.objects.get().expires_at
    assert locks.extend(lock) and GenerationLease.objects.get().expires_at >= before
    lock.release()


@pytest.mark.django_db
def test_chat_works_when_redis_is_unreachable(alice, alice_client, chat_agent, fake_upstream, settings):
    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    shared_redis.get_redis.cache_clear()
    try:
        (conversation,) = _conversations(alice, chat_agent, 1)
        url = f"/api/conversations/{conversation.pk}/messages/"
        replies = [alice_client.post(url, {"content": f"q{n}"}, format="json") for n in range(2)]
    finally:
        shared_redis.get_redis.cache_clear()
    assert [r.status_code for r in replies] == [201, 201]
    assert [r.json()["sequence"] for r in replies] == [2, 4]
    assert GenerationLease.objects.count() == 0
