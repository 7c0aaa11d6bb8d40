"""Guarantees held by PostgreSQL under real concurrency: create dedupe and sequence numbers."""

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from django.db import connections
from rest_framework.test import APIClient

from aiwriter import redis as shared_redis
from conversations import sequence
from conversations.models import Conversation, Message

WORKERS = 25  # concurrent threads (each holds a database connection; the server allows 100 in all)


def _creates(user, agent, n):
    barrier = threading.Barrier(WORKERS)

    def create(i):
        client = APIClient()
        client.force_authenticate(user)
        try:
            if i < WORKERS:
                barrier.wait(timeout=10)
            return client.post("/api/conversations/", {"agent": agent.slug, "project": "same"}, format="json")
        finally:
            connections.close_all()

    with ThreadPoolExecutor(WORKERS) as pool:
        return list(pool.map(create, range(n)))


def _assert_one_row(responses):
    assert sorted(r.status_code for r in responses) == [200] * (len(responses) - 1) + [201]
    assert len({r.json()["id"] for r in responses}) == 1
    assert Conversation.objects.count() == 1


@pytest.mark.pg
@pytest.mark.django_db(transaction=True)
def test_100_identical_concurrent_creates_make_one_row(alice, chat_agent):
    _assert_one_row(_creates(alice, chat_agent, 100))


@pytest.mark.pg
@pytest.mark.django_db(transaction=True)
def test_100_identical_concurrent_creates_make_one_row_without_redis(alice, chat_agent, no_redis, settings):
    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.dummy.DummyCache"}}
    _assert_one_row(_creates(alice, chat_agent, 100))


def _write_concurrently(conversation, n):
    barrier = threading.Barrier(n)

    def write(i):
        try:
            barrier.wait(timeout=10)
            return sequence.insert_with_sequence(
                conversation.pk, 1,
                lambda numbers: Message.objects.create(conversation=conversation, role="user", content=f"m{i}",
                                                       sequence=numbers[0]).sequence)
        finally:
            connections.close_all()

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(write, range(n)))


@pytest.mark.pg
@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
def test_sequence_numbers_unique_under_50_concurrent_writers(alice, chat_agent):
    conversation = Conversation.objects.create(owner=alice, agent=chat_agent)
    numbers = _write_concurrently(conversation, 50)
    assert sorted(numbers) == list(range(1, 51))


@pytest.mark.pg
@pytest.mark.django_db(transaction=True)
def test_sequence_numbers_unique_under_50_concurrent_writers_without_redis(alice, chat_agent, no_redis):
    conversation = Conversation.objects.create(owner=alice, agent=chat_agent)
    assert sorted(_write_concurrently(conversation, 50)) == list(range(1, 51))


@pytest.mark.pg
@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
def test_a_stale_redis_counter_is_repaired_from_the_database(alice, chat_agent):
    conversation = Conversation.objects.create(owner=alice, agent=chat_agent)
    for n in range(1, 11):
        Message.objects.create(conversation=conversation, role="user", sequence=n)
    shared_redis.get_redis().set(sequence._counter_key(conversation.pk), 3)  # e.g. restored from an old snapshot
    numbers = _write_concurrently(conversation, 20)
    assert len(set(numbers)) == 20 and min(numbers) > 10
    assert Message.objects.filter(conversation=conversation).count() == 30


@pytest.mark.django_db
def test_sequence_numbers_continue_from_the_database(alice, chat_agent):
    conversation = Conversation.objects.create(owner=alice, agent=chat_agent)
    Message.objects.create(conversation=conversation, role="user", sequence=7)
    assert sequence.insert_with_sequence(conversation.pk, 2, lambda numbers: numbers) == [8, 9]


@pytest.mark.pg
@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
def test_a_double_submitted_client_id_is_answered_and_charged_once(alice, fake_upstream):
    """Ten copies of one message (same client_id) at once: one model call, one charge, one exchange."""
    from decimal import Decimal

    from tests.factories import make_agent, make_fake_model
    from usage.billing.ledger import grant_credits
    from usage.models import LedgerEntry, UsageRecord

    grant_credits(user=alice, amount=Decimal("5"), reason="test top-up", created_by=None)
    agent = make_agent("paid", model=make_fake_model(fake_upstream, "paid-model", input_price="1", output_price="2"))
    conversation = Conversation.objects.create(owner=alice, agent=agent)
    fake_upstream.configure("paid-model", latency=0.3)
    url = f"/api/conversations/{conversation.pk}/messages/"
    barrier = threading.Barrier(10)

    def post(_):
        client = APIClient()
        client.force_authenticate(alice)
        try:
            barrier.wait(timeout=10)
            return client.post(url, {"content": "once", "client_id": "double-click"}, format="json")
        finally:
            connections.close_all()

    with ThreadPoolExecutor(10) as pool:
        responses = list(pool.map(post, range(10)))
    created = [r for r in responses if r.status_code == 201]
    assert len(created) == 1 and all(r.status_code in (200, 409) for r in responses if r is not created[0])
    assert all(r.json()["error"]["code"] == "conversation_busy" for r in responses if r.status_code == 409)
    assert all(r.json() == created[0].json() for r in responses if r.status_code == 200)
    client = APIClient()
    client.force_authenticate(alice)
    later = client.post(url, {"content": "once", "client_id": "double-click"}, format="json")
    assert later.status_code == 200 and later.json() == created[0].json()
    assert len(fake_upstream.requests) == 1 and Message.objects.filter(conversation=conversation).count() == 2
    assert UsageRecord.objects.filter(user=alice).count() == 1
    assert LedgerEntry.objects.filter(account__user=alice, kind="charge").count() == 1
