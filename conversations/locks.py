"""One generation at a time per conversation, and at most N generating conversations per user.

Redis is the fast path: one Lua script takes the conversation lock (SET NX PX with a random token)
and a slot in the user's sorted set of running generations, atomically, so the limit holds across
processes. Release is compare-and-delete, so a lock that expired and was taken by someone else is
never released by the old holder. The lock and slot are the generation's lease: its heartbeat
(`generation.run_exchange`, every 2 s) extends them, so a crashed worker's expire CONVERSATION_LOCK_SECONDS
(15 s by default) after it died.

Without Redis (unset or unreachable) the same rules are held by the database: one GenerationLease row
per conversation (unique), counted per user under a PostgreSQL advisory lock.

Across an outage both paths also count what the database knows is running: unexpired leases and replies
still `processing` (touched within CONVERSATION_LOCK_SECONDS). So a generation that began on Redis is
still seen when Redis goes away, and one that began on a lease is still seen when an empty Redis comes
back. After a Redis failure this process skips Redis for redis_guard.PAUSE_SECONDS, then tries it again.
"""

from __future__ import annotations

import logging
import secrets
import threading
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta

import redis
from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from aiwriter import redis as shared_redis
from aiwriter import redis_guard
from aiwriter.errors import ApiError
from conversations.models import GenerationLease, Message

logger = logging.getLogger(__name__)


class ConversationBusy(ApiError):
    status_code = 409
    code = "conversation_busy"
    message = "This conversation is already generating a reply; wait for it or cancel it."
    retryable = True


class TooManyConcurrent(ApiError):
    status_code = 429
    code = "too_many_concurrent"
    message = "Too many conversations are generating at once; wait for one to finish."
    retryable = True


# KEYS: lock, user's running set. ARGV: token, ttl ms, limit, member.
# Returns -1 (busy), -2 (limit) or, taken, the members of the running set.
_ACQUIRE = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now_ms)
if redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[3]) then return -2 end
redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
redis.call('ZADD', KEYS[2], now_ms + tonumber(ARGV[2]), ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return redis.call('ZRANGE', KEYS[2], 0, -1)
"""

# Compare-and-delete: only the holder's token releases the lock and its slot.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[2], ARGV[2])
  return 1
end
return 0
"""

# Extends the lock (and the slot) only while we still hold it.
_EXTEND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  local now = redis.call('TIME')
  local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  redis.call('ZADD', KEYS[2], now_ms + tonumber(ARGV[2]), ARGV[3])
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
  return 1
end
return 0
"""

# In-process guard for the SQLite fallback, where there is no row lock to serialise on.
_local_guard = threading.Lock()


@dataclass
class GenerationLock:
    conversation_id: int
    owner_id: int
    token: str
    backend: str  # "redis" or "db"

    def release(self) -> bool:
        return release(self)


def _keys(owner_id: int, conversation_id: int) -> tuple[str, str]:
    # The {u<id>} hash tag keeps both keys in one cluster slot, as a multi-key script needs.
    return (shared_redis.key(f"{{u{owner_id}}}", "lock", "conv", conversation_id),
            shared_redis.key(f"{{u{owner_id}}}", "generating"))


def _ttl_seconds() -> int:
    return settings.CONVERSATION_LOCK_SECONDS


def acquire(*, owner_id: int, conversation_id: int) -> GenerationLock:
    """Takes the conversation's lock and a per-user slot, or raises ConversationBusy / TooManyConcurrent."""
    token = secrets.token_hex(16)
    client = shared_redis.get_redis()
    if client is not None and redis_guard.available():
        try:
            return _acquire_redis(client, owner_id, conversation_id, token)
        except redis.RedisError as exc:
            redis_guard.failed("conversation locks", exc)
    return _acquire_db(owner_id, conversation_id, token)


def running_in_db(owner_id: int) -> set[int]:
    """Conversations of this owner the database knows are generating: live leases, recent `processing` replies."""
    now = timezone.now()
    running = set(GenerationLease.objects.filter(owner_id=owner_id, expires_at__gt=now)
                  .values_list("conversation_id", flat=True))
    running.update(Message.objects.filter(
        conversation__owner_id=owner_id, role=Message.Role.ASSISTANT, status=Message.Status.PROCESSING,
        updated_at__gt=now - timedelta(seconds=_ttl_seconds())).values_list("conversation_id", flat=True))
    return running


def _acquire_redis(client: redis.Redis, owner_id: int, conversation_id: int, token: str) -> GenerationLock:
    lock_key, running_key = _keys(owner_id, conversation_id)
    outcome = client.eval(_ACQUIRE, 2, lock_key, running_key, token, _ttl_seconds() * 1000,
                          settings.MAX_CONCURRENT_CONVERSATIONS, conversation_id)
    if outcome == -1:
        raise ConversationBusy()
    if outcome == -2:
        raise TooManyConcurrent()
    lock = GenerationLock(conversation_id, owner_id, token, "redis")
    # Generations Redis does not know of (begun during an outage, or before Redis restarted empty).
    running = running_in_db(owner_id)
    if conversation_id in running or len(running | {int(m) for m in outcome}) > settings.MAX_CONCURRENT_CONVERSATIONS:
        release(lock)
        raise ConversationBusy() if conversation_id in running else TooManyConcurrent()
    return lock


def _acquire_db(owner_id: int, conversation_id: int, token: str) -> GenerationLock:
    now = timezone.now()
    try:
        with _local_guard if not settings.IS_POSTGRES else nullcontext(), transaction.atomic():
            if settings.IS_POSTGRES:
                # Serialises acquisitions per user across processes until the transaction ends.
                with connection.cursor() as cursor:
                    cursor.execute("SELECT pg_advisory_xact_lock(%s, %s)", [_ADVISORY_GENERATION, owner_id])
            GenerationLease.objects.filter(owner_id=owner_id, expires_at__lte=now).delete()
            GenerationLease.objects.filter(conversation_id=conversation_id, expires_at__lte=now).delete()
            if GenerationLease.objects.filter(conversation_id=conversation_id).exists():
                raise ConversationBusy()
            # Leases, plus replies still being written by generations that took their lock in Redis.
            running = running_in_db(owner_id)
            if conversation_id in running:
                raise ConversationBusy()
            if len(running) >= settings.MAX_CONCURRENT_CONVERSATIONS:
                raise TooManyConcurrent()
            GenerationLease.objects.create(conversation_id=conversation_id, owner_id=owner_id, token=token,
                                           expires_at=now + timedelta(seconds=_ttl_seconds()))
    except IntegrityError as exc:  # another process took this conversation between our check and insert
        raise ConversationBusy() from exc
    return GenerationLock(conversation_id, owner_id, token, "db")


def release(lock: GenerationLock) -> bool:
    """Releases the lock if we still hold it; never raises (an unreleased lock expires)."""
    try:
        if lock.backend == "redis":
            client = shared_redis.get_redis()
            if client is None:
                return False
            lock_key, running_key = _keys(lock.owner_id, lock.conversation_id)
            return bool(client.eval(_RELEASE, 2, lock_key, running_key, lock.token, lock.conversation_id))
        deleted, _ = GenerationLease.objects.filter(conversation_id=lock.conversation_id, token=lock.token).delete()
        return deleted > 0
    except Exception:  # noqa: BLE001 - releasing must not mask the outcome; the lock expires anyway
        logger.exception("could not release the lock of conversation %s", lock.conversation_id)
        return False


def extend(lock: GenerationLock) -> bool:
    """The heartbeat: pushes the expiry out by another CONVERSATION_LOCK_SECONDS; never raises."""
    try:
        if lock.backend == "redis":
            client = shared_redis.get_redis()
            if client is None:
                return False
            lock_key, running_key = _keys(lock.owner_id, lock.conversation_id)
            return bool(client.eval(_EXTEND, 2, lock_key, running_key, lock.token, _ttl_seconds() * 1000,
                                    lock.conversation_id))
        return GenerationLease.objects.filter(conversation_id=lock.conversation_id, token=lock.token).update(
            expires_at=timezone.now() + timedelta(seconds=_ttl_seconds())) > 0
    except Exception:  # noqa: BLE001 - a failed extension only means the lock may expire early
        logger.exception("could not extend the lock of conversation %s", lock.conversation_id)
        return False


def is_locked(conversation_id: int, owner_id: int) -> bool:
    """Whether a generation holds the conversation (for tests and the sweeper)."""
    client = shared_redis.get_redis()
    if client is not None:
        try:
            lock_key, _ = _keys(owner_id, conversation_id)
            if client.exists(lock_key):
                return True
        except redis.RedisError:
            pass
    return GenerationLease.objects.filter(conversation_id=conversation_id, expires_at__gt=timezone.now()).exists()


# Namespaces for pg_advisory_xact_lock(int, int): the first key says what the lock is for.
_ADVISORY_GENERATION = 41_001
ADVISORY_DEDUPE = 41_002
ADVISORY_SEQUENCE = 41_003

