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
