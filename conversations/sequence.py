"""Message sequence numbers: unique and increasing within a conversation, across processes.

Fast path: Redis INCR on a per-conversation counter, seeded from the database's highest number the
first time (SET NX, so only one seeder wins). The unique constraint (conversation, sequence) is the
guarantee: if a number collides anyway (Redis flushed, failed over), `insert_with_sequence` retries
with numbers from the database, allocated under a per-conversation advisory lock.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import redis
from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import Max

from aiwriter import redis as shared_redis
from aiwriter import redis_guard
from conversations.locks import ADVISORY_SEQUENCE
from conversations.models import Message

logger = logging.getLogger(__name__)

T = TypeVar("T")

_COUNTER_TTL_SECONDS = 7 * 24 * 3600
_MAX_ATTEMPTS = 5


def _counter_key(conversation_id: int) -> str:
    return shared_redis.key("seq", "conv", conversation_id)


def _db_max(conversation_id: int) -> int:
    return Message.objects.filter(conversation_id=conversation_id).aggregate(m=Max("sequence"))["m"] or 0


def next_sequences_redis(conversation_id: int, count: int) -> list[int] | None:
    """`count` consecutive numbers from Redis, or None when Redis is absent or down."""
    client = shared_redis.get_redis()
    if client is None or not redis_guard.available():
        return None
    counter = _counter_key(conversation_id)
    try:
        if not client.exists(counter):
            client.set(counter, _db_max(conversation_id), nx=True, ex=_COUNTER_TTL_SECONDS)
        pipe = client.pipeline()
        pipe.incrby(counter, count)
        pipe.expire(counter, _COUNTER_TTL_SECONDS)
        last = pipe.execute()[0]
    except redis.RedisError as exc:
        redis_guard.failed("sequence numbers", exc)
        return None
    return list(range(last - count + 1, last + 1))


def next_sequences_db(conversation_id: int, count: int) -> list[int]:
    """Numbers from the database; call inside the transaction that inserts them.

    On PostgreSQL an advisory transaction lock per conversation serialises database allocations. Not a
    row lock on the conversation: a concurrent fast-path insert holds a unique-index entry while its
    foreign-key check waits for that row lock, and our insert would wait for its entry — a deadlock.
    """
    if settings.IS_POSTGRES:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s, %s)", [ADVISORY_SEQUENCE, conversation_id])
    last = _db_max(conversation_id)
    _bump_redis(conversation_id, last + count)
    return list(range(last + 1, last + count + 1))


# KEYS: the counter. ARGV: at least this, ttl seconds. The counter only ever moves up.
BUMP = ("local v = tonumber(redis.call('GET', KEYS[1]) or '0') "
        "if v < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2]) end return 1")


def _bump_redis(conversation_id: int, at_least: int) -> None:
    """Moves the Redis counter past numbers the database handed out, so the fast path resumes safely."""
    client = shared_redis.get_redis()
    if client is None or not redis_guard.available():
        return
    try:
        client.eval(BUMP, 1, _counter_key(conversation_id), at_least, _COUNTER_TTL_SECONDS)
    except redis.RedisError as exc:
        redis_guard.failed("sequence numbers", exc)


def insert_with_sequence(conversation_id: int, count: int, insert: Callable[[list[int]], T], *,
                         from_database: bool = False) -> T:
    """Calls `insert(numbers)` in a transaction with `count` fresh numbers; retries on a collision.

    `insert` must raise IntegrityError on a duplicate (the unique constraint does that) and nothing
    else of its own must be able to collide. `from_database`: skip Redis (its numbers just collided).
    """
    numbers = None if from_database else next_sequences_redis(conversation_id, count)
    for attempt in range(_MAX_ATTEMPTS):
        try:
            with transaction.atomic():
                if numbers is None:
                    numbers = next_sequences_db(conversation_id, count)
                return insert(numbers)
        except IntegrityError as exc:
            if not _is_sequence_collision(exc) or attempt == _MAX_ATTEMPTS - 1:
                raise
            logger.warning("sequence collision in conversation %s, retrying from the database", conversation_id)
            numbers = None
    raise AssertionError("unreachable")


def _is_sequence_collision(exc: IntegrityError) -> bool:
    text = str(exc)
    return "uniq_message_sequence" in text or "sequence" in text
