"""A websocket chat turn's start on the event loop: conversation, lock, key limits and messages without a thread hop.

`begin_turn` does what the consumer's sync `_begin` did through Channels' one database thread per process —
services.create_conversation (with its 5-minute dedupe) or selectors.conversation_for, then
services.begin_exchange — with the database work as single statements on aiwriter.dbpool (conversations.turnsql)
and the Redis steps (the conversation lock and per-user slot, the key's rate limits, sequence numbers) on the
async Redis client. A usual turn waits for two statements (the create with its agent's lookup, or the lookup;
then the reads after the lock and the insert, one statement, with the prompt's history pipelined after it) and
two Redis scripts (the lock; the sequence numbers, which a conversation the turn created sets while the insert
runs), all on the loop. The prompt's other reads (memory, the key's fallback check) run alongside, from the
moment the conversation is known (prompt.Prefetched), so the reply's first delta waits for none of them.

The sync services stay the reference and the fallback (through sync_to_async): SQLite and DB_ASYNC_POOL off
(dbpool.enabled()), no Redis or Redis down (the database lease path), no free pool connection, and the rare
branches — a client_id sent before (replay), a reply stuck past its lease (the sweep), a sequence collision.
The guarantees are the sync path's: the lock and the per-user limit are the same Redis script plus the same
database check; the dedupe is the same advisory lock around the check-then-insert.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import redis
from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.cache import cache
from django.utils import timezone

from aiwriter import dbpool, redis_guard
from aiwriter import redis as shared_redis
from aiwriter.db import released
from aiwriter.errors import NotFound
from aiwriter.observability import add_db_query
from conversations import hotpath, locks, moderation, prompt, selectors, sequence, services, turnsql
from conversations.models import Conversation, Message
from conversations.services import Exchange
from usage import hotpath as call_hotpath
from usage import keylimits, periods
from usage.billing import holds
from usage.selectors import limits_from_rows

logger = logging.getLogger(__name__)

# KEYS: the conversation's counter. ARGV: count, ttl seconds, seed ('' = unknown: the caller reads the database).
# Returns the last number taken, or false when the counter is missing and no seed was given.
_NEXT_SEQUENCES = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  if ARGV[3] == '' then return false end
  redis.call('SET', KEYS[1], ARGV[3], 'EX', ARGV[2])
end
local last = redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return last
"""


class _UseSyncPath(Exception):
    """The async path stops here, having undone what it took; the sync service does the turn instead."""


async def begin_turn(*, user: Any, api_key: Any, conversation_id: int | None, agent: Any, project: str,
                     content: Any, client_id: str | None, new: bool) -> Exchange:
    """The consumer's turn start: a new (deduplicated) conversation or the user's own, then the exchange begun.
    Same errors, rows and outcomes as the sync services (tests/test_turnstart.py)."""
    task = asyncio.ensure_future(_begin_turn(user, api_key, conversation_id, agent, project, content, client_id,
                                             new))
    try:
        # Like the thread it replaces, a begun turn runs to its end even if the socket's frame task is cancelled.
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        raise


async def _begin_turn(user: Any, api_key: Any, conversation_id: int | None, agent: Any, project: str,
                      content: Any, client_id: str | None, new: bool) -> Exchange:
    if not _async_path_available():
        return await sync_to_async(released(sync_begin))(user, api_key, conversation_id, agent, project, content,
                                                          client_id, new)
    remembered: asyncio.Future | None = None
    created = False
    try:
        if conversation_id is None:
            conversation, created, replay_possible, remembered = await _create_conversation(
                user, api_key, agent, project, new, client_id)
        else:
            conversation, replay_possible = await _conversation_for(user, api_key, conversation_id, client_id)
    except dbpool.PoolTimeout:
        logger.warning("async pool exhausted: a turn of user %s starts through the sync path", user.pk)
        return await sync_to_async(released(sync_begin))(user, api_key, conversation_id, agent, project, content,
                                                          client_id, new)
    try:
        return await _begin_exchange(user, api_key, conversation, content, client_id, replay_possible, created)
    except _UseSyncPath:
        return await sync_to_async(released(services.begin_exchange))(
            user=user, conversation=conversation, content=content, client_id=client_id, api_key=api_key)
    finally:
        if remembered is not None:
            await remembered


def sync_begin(user: Any, api_key: Any, conversation_id: int | None, agent: Any, project: str, content: Any,
               client_id: str | None, new: bool) -> Exchange:
    """The turn start on the sync services (the reference; SQLite and every fallback)."""
    if conversation_id is None:
        conversation, _ = services.create_conversation(user=user, agent=services.resolve_agent(agent),
                                                       project=project, api_key=api_key, new=new,
                                                       client_id=client_id)
    else:
        conversation = selectors.conversation_for(user=user, conversation_id=conversation_id)
    return services.begin_exchange(user=user, conversation=conversation, content=content, client_id=client_id,
                                   api_key=api_key)


def on_pool() -> bool:
    """The socket's database work goes on the pool: dbpool.enabled(), unless an experiment turns it off
    (bench/settings_ws_sync_turn_start.py, the "before" of BENCHMARKS.md)."""
    return dbpool.enabled() and getattr(settings, "WS_TURN_START_ON_POOL", True)


def _async_path_available() -> bool:
    # Without Redis the lock is a lease row under an advisory lock: the sync path keeps that (rarer) case.
    return on_pool() and shared_redis.get_async_redis() is not None and redis_guard.available()


async def _fetchone(sql: str, params: list[Any]) -> tuple | None:
    try:
        return await dbpool.fetchone(sql, params)
    except dbpool.psycopg.Error as exc:
        raise dbpool.django_error(exc) from exc


# An id past PostgreSQL's bigint matches no row (as the ORM answers), rather than failing the statement.
_MAX_ID = 2**63 - 1


async def assert_owned(*, user: Any, conversation_id: int) -> None:
    """selectors.conversation_for for a frame that only needs ownership (cancel, subscribe): NotFound if not."""
    if conversation_id > _MAX_ID:
        raise NotFound("Conversation not found.")
    if not on_pool():
        await sync_to_async(released(selectors.conversation_for))(user=user, conversation_id=conversation_id)
        return
    try:
        row = await _fetchone(*turnsql.owned_statement(user_id=user.pk, conversation_id=conversation_id))
    except dbpool.PoolTimeout:
        await sync_to_async(released(selectors.conversation_for))(user=user, conversation_id=conversation_id)
        return
    if row is None:
        raise NotFound("Conversation not found.")


# --- the conversation ------------------------------------------------------------------------------

async def _conversation_for(user: Any, api_key: Any, conversation_id: int,
                            client_id: str | None) -> tuple[Conversation, bool]:
    client_id = (client_id or None) and str(client_id)[:64]
    if conversation_id > _MAX_ID:
        raise NotFound("Conversation not found.")
    row = await _fetchone(*turnsql.conversation_statement(user_id=user.pk, conversation_id=conversation_id,
                                                          api_key=api_key, client_id=client_id))
    if row is None:
        raise NotFound("Conversation not found.")
    n = turnsql.width(Conversation)
    conversation = turnsql.from_row(Conversation, row[:n])
    conversation.agent = turnsql.agent_from_row(row[n:-2])
    if not row[-2]:
        raise services.UnknownAgent()  # check_key_access, as begin_exchange starts
    return conversation, bool(row[-1])


async def _create_conversation(user: Any, api_key: Any, slug_or_id: Any, project: str, new: bool,
                               client_id: str | None) -> tuple[Conversation, bool, bool, asyncio.Future | None]:
    """services.create_conversation: the newest recent conversation with this agent and project, or a new one.
    Returns it, whether it was created, whether a replay is possible, and the dedupe cache write, under way
    meanwhile (the caller awaits it before it returns)."""
    if not isinstance(slug_or_id, str) or not slug_or_id:
        raise services.UnknownAgent()  # the frame's agent is a string; resolve_agent finds nothing else either
    since = timezone.now() - timedelta(seconds=settings.CONVERSATION_DEDUPE_SECONDS)
    draft = Conversation(owner=user, project=project, title="")
    # The agent's lookup and key check are part of the create: one round trip (no row: unknown or not allowed).
    sql, params = turnsql.create_statement(draft, slug_or_id=slug_or_id, api_key=api_key, new=new,
                                           client_id=client_id, since=since)
    if new and not client_id:
        row = await _fetchone(sql, params)  # nothing to check: one INSERT
    else:
        row = await _checked_create(user.pk, sql, params)
    if row is None:
        raise services.UnknownAgent()  # resolve_agent or check_key_access; nothing was written
    n = turnsql.width(Conversation)
    conversation = turnsql.from_row(Conversation, row[:n])
    conversation.agent = turnsql.agent_from_row(row[n + 2:])
    created, replay_possible = bool(row[n]), bool(row[n + 1])
    remembered = asyncio.ensure_future(_remember_for_dedupe(conversation)) if created or not new else None
    return conversation, created, replay_possible, remembered


async def _checked_create(user_id: int, sql: str, params: list[Any]) -> tuple | None:
    """The check-then-insert under the same per-user advisory lock as the sync path (so 100 identical concurrent
    requests, on either path, make one row). Its own statement after the lock: it must see what the lock's
    previous holder committed."""
    pool = await dbpool.get_pool()
    started = time.perf_counter()
    try:
        # One pipeline, one round trip: the lock is held only while the server works, never across a wait for
        # this event loop (a busy loop would otherwise hold every create of the user behind it). A failed
        # statement leaves the connection in a failed transaction: the pool closes it rather than reuse it.
        async with pool.connection() as conn, conn.pipeline() as pipeline:
            await conn.execute("BEGIN")
            await conn.execute("SELECT pg_advisory_xact_lock(%s::integer, %s::integer)",
                               [locks.ADVISORY_DEDUPE, user_id])
            cursor = await conn.execute(sql, params)
            await conn.execute("COMMIT")
            await pipeline.sync()
            return await cursor.fetchone()
    except dbpool.psycopg.Error as exc:
        raise dbpool.django_error(exc) from exc
    finally:
        add_db_query((time.perf_counter() - started) * 1000)


async def _remember_for_dedupe(conversation: Conversation) -> None:
    """create_conversation's cache entry (its fast path) so the sync path finds this conversation too."""
    key = services._dedupe_cache_key(conversation.owner_id, conversation.agent_id, conversation.project)
    timeout = settings.CONVERSATION_DEDUPE_SECONDS
    if timeout <= 0:  # dedupe off: nothing to remember (Redis refuses an expiry of 0)
        return
    backend = getattr(cache, "client", None)
    try:
        if backend is not None and hasattr(backend, "encode"):  # django_redis: the same key, written on the loop
            client = shared_redis.get_async_redis()
            if client is not None:
                await client.set(str(cache.make_key(key)), backend.encode(conversation.pk), ex=timeout)
        else:
            cache.set(key, conversation.pk, timeout=timeout)  # in-process (locmem): no I/O
    except Exception as exc:  # noqa: BLE001 - the cache is only a fast path (django_redis ignores its failures too)
        logger.warning("dedupe cache entry of conversation %s not written (%r)", conversation.pk, exc)


# --- the exchange ------------------------------------------------------------------------------------

async def _begin_exchange(user: Any, api_key: Any, conversation: Conversation, content: Any,
                          client_id: str | None, replay_possible: bool, created: bool) -> Exchange:
    """services.begin_exchange (key access already checked with the conversation's read)."""
    content = services._validate_content(content)
    client_id = (client_id or None) and str(client_id)[:64]
    if replay_possible:
        raise _UseSyncPath()  # services._replay answers (a message re-sent after a reconnect)
    # The prompt's reads that need no lock start now, alongside the lock and the insert (and, in the same round trip,
    # the quota limits of a project the call's hold has not met yet).
    also, on_read = _limits_warmup(user.pk, conversation.project)
    reads = prompt.Prefetched(conversation=conversation, content=content, user=user, api_key=api_key, also=also,
                              on_read=on_read)
    try:
        lock, running_in_redis = await _acquire_lock(user.pk, conversation.pk)
    except BaseException:
        await reads.settle()
        raise
    hold: keylimits.Hold | None = None
    try:
        wanted = services.key_rate_request(api_key, content, conversation.agent)
        if wanted is not None:
            hold = await keylimits.acquire(api_key, prompt_tokens=wanted[0], max_output_tokens=wanted[1])
        user_message, reply = await _insert(conversation, content, client_id, created, lock, running_in_redis,
                                            reads)
        exchange = Exchange(conversation=conversation, user_message=user_message, reply=reply, lock=lock,
                            extra={"key_hold": hold, "prompt": reads})
        await _moderate(exchange)
        if exchange.finished:  # rejected: no prompt to build
            await reads.settle()
        return exchange
    except BaseException:
        await _settle_unused(hold)  # once only: a no-op after moderation settled it
        await _release(lock)  # compare-and-delete: a no-op once released
        await reads.settle()
        raise


def _limits_warmup(user_id: int, project: str) -> tuple[dict[str, tuple[str, list[Any]]],
                                                        Callable[[dict[str, list[tuple[Any, ...]]]], None] | None]:
    """The call's hold (usage.hotpath.begin_call) reads the quota limits of an account and project it has not cached
    yet (a new project: its first turn) before it holds: that read is made here instead, ahead, with the same
    statement, and cached as begin_call caches it (holds.remember_limits), so the hold finds it. Nothing when cached.
    Limits found are checked against the counters by begin_call itself, as with any cached limits."""
    if holds.cached_limits(user_id, project) is not None:
        return {}, None
    statement = call_hotpath.limits_statement(user_id=user_id, project=project,
                                              period=periods.month_start(timezone.now()), quota=True,
                                              api_key_id=None)

    def remember(rows: dict[str, list[tuple[Any, ...]]]) -> None:
        if holds.cached_limits(user_id, project) is None:
            holds.remember_limits(user_id, project, limits_from_rows(
                {str(p): (t, c) for kind, p, t, c in rows["limits"] if kind == "q"}))

    return {"limits": statement}, remember


async def _acquire_lock(owner_id: int, conversation_id: int) -> tuple[locks.GenerationLock, set[int]]:
    """locks._acquire_redis's script on the async client: the lock and the conversations Redis knows are running.
    Redis down: the sync path (its database lease)."""
    client = shared_redis.get_async_redis()
    assert client is not None
    token = secrets.token_hex(16)
    lock_key, running_key = locks._keys(owner_id, conversation_id)
    try:
        outcome = await client.eval(locks._ACQUIRE, 2, lock_key, running_key, token,
                                    settings.CONVERSATION_LOCK_SECONDS * 1000,
                                    settings.MAX_CONCURRENT_CONVERSATIONS, conversation_id)
    except redis.RedisError as exc:
        redis_guard.failed("conversation locks", exc)
        raise _UseSyncPath() from exc
    if outcome == -1:
        raise locks.ConversationBusy()
    if outcome == -2:
        raise locks.TooManyConcurrent()
    return locks.GenerationLock(conversation_id, owner_id, token, "redis"), {int(m) for m in outcome}


async def _next_sequences(conversation: Conversation) -> list[int] | None:
    """sequence.next_sequences_redis on the async client: two numbers, or None when Redis failed."""
    client = shared_redis.get_async_redis()
    if client is None or not redis_guard.available():
        return None
    counter = sequence._counter_key(conversation.pk)
    ttl = sequence._COUNTER_TTL_SECONDS
    # A conversation with no messages yet seeds its counter with 0 without asking the database.
    seed = "0" if conversation.message_count == 0 else ""
    try:
        last = await client.eval(_NEXT_SEQUENCES, 1, counter, 2, ttl, seed)
        if last is None:
            row = await _fetchone(f"SELECT COALESCE(MAX(sequence), 0) FROM {turnsql.table(Message)} "
                                  f"WHERE conversation_id = %s", [conversation.pk])
            assert row is not None
            last = await client.eval(_NEXT_SEQUENCES, 1, counter, 2, ttl, str(row[0]))
    except redis.RedisError as exc:
        redis_guard.failed("sequence numbers", exc)
        return None
    except dbpool.PoolTimeout:
        return None  # the sync insert allocates from the database
    return [int(last) - 1, int(last)]


async def _insert(conversation: Conversation, content: str, client_id: str | None, created: bool,
                  lock: locks.GenerationLock, running_in_redis: set[int],
                  reads: prompt.Prefetched) -> tuple[Message, Message]:
    """What the sync path reads once the lock is taken, then services.insert_exchange, as one statement with Redis's
    numbers (turnsql.checked_insert_statement), and the prompt's history in the same round trip. A collision,
    Redis down or no free connection: the sync path (numbers from the database, under its advisory lock).
    A conversation this turn created takes 1 and 2 without waiting for Redis: its counter is set meanwhile."""
    seeded = asyncio.ensure_future(_seed_sequences(conversation, 2)) if created else None
    try:
        numbers = [1, 2] if created else await _next_sequences(conversation)
        if numbers is None:
            raise _UseSyncPath()
        return await _checked_insert(conversation, content, client_id, numbers, lock, running_in_redis, reads)
    finally:
        if seeded is not None:
            await seeded


async def _checked_insert(conversation: Conversation, content: str, client_id: str | None, numbers: list[int],
                          lock: locks.GenerationLock, running_in_redis: set[int],
                          reads: prompt.Prefetched) -> tuple[Message, Message]:
    user_message, reply = services.new_exchange_messages(conversation, content, client_id, numbers)
    title = services.title_for(content) if not conversation.title else ""
    statements = {
        # Under the lock every message of the conversation is final, and older than this turn's.
        "history": prompt.history_statement(conversation.pk, numbers[0]),
        "insert": turnsql.checked_insert_statement(
            conversation, user_message, reply, title, owner_id=lock.owner_id, client_id=client_id,
            now=timezone.now(), running_in_redis=running_in_redis,
            max_running=settings.MAX_CONCURRENT_CONVERSATIONS)}
    try:
        rows = await prompt._fetch_pipelined(statements)
    except dbpool.PoolTimeout as exc:
        raise _UseSyncPath() from exc
    except dbpool.psycopg.errors.UniqueViolation as exc:
        if "uniq_message_sequence" not in str(exc):
            raise dbpool.django_error(exc) from exc
        logger.warning("sequence collision in conversation %s, retrying from the database", conversation.pk)
        raise _UseSyncPath() from exc
    except dbpool.psycopg.Error as exc:
        raise dbpool.django_error(exc) from exc
    running, stuck, replay, user_id, reply_id, stored_title = rows["insert"][0]
    if user_id is None:  # the reads after the lock said no: as the sync path answers them
        if lock.conversation_id in running:
            raise locks.ConversationBusy()
        if len(set(running) | running_in_redis) > settings.MAX_CONCURRENT_CONVERSATIONS:
            raise locks.TooManyConcurrent()
        if stuck:  # a dead worker's reply (its lock expired): end it now, as the sync path does
            await sync_to_async(released(services.sweep_stuck_messages))(
                older_than_seconds=settings.CONVERSATION_LOCK_SECONDS, conversation_id=conversation.pk)
        if replay or not stuck:
            raise _UseSyncPath()  # services._replay answers (a twin request finished while we waited)
        return await _insert_numbered(conversation, content, client_id, numbers)
    reads.history = rows["history"]
    return _stored(conversation, user_message, reply, user_id, reply_id, stored_title)


def _stored(conversation: Conversation, user_message: Message, reply: Message, user_id: int, reply_id: int,
            title: str) -> tuple[Message, Message]:
    user_message.pk, reply.pk = user_id, reply_id
    for message in (user_message, reply):
        message._state.adding, message._state.db = False, "default"
    reply.reply_to = user_message
    conversation.title = title
    conversation.message_count += 2
    return user_message, reply


async def _seed_sequences(conversation: Conversation, last: int) -> None:
    """A new conversation's counter, moved up to `last` (never down: a twin turn may have counted on)."""
    client = shared_redis.get_async_redis()
    if client is None or not redis_guard.available():
        return
    try:
        await client.eval(sequence.BUMP, 1, sequence._counter_key(conversation.pk), last,
                          sequence._COUNTER_TTL_SECONDS)
    except redis.RedisError as exc:
        redis_guard.failed("sequence numbers", exc)


async def _insert_numbered(conversation: Conversation, content: str, client_id: str | None,
                           numbers: list[int] | None) -> tuple[Message, Message]:
    if numbers is not None:
        user_message, reply = services.new_exchange_messages(conversation, content, client_id, numbers)
        title = services.title_for(content) if not conversation.title else ""
        sql, params = turnsql.insert_statement(conversation, user_message, reply, title)
        try:
            row = await dbpool.fetchone(sql, params)
        except dbpool.PoolTimeout:
            row = None
        except dbpool.psycopg.errors.UniqueViolation as exc:
            if "uniq_message_sequence" not in str(exc):
                raise dbpool.django_error(exc) from exc
            logger.warning("sequence collision in conversation %s, retrying from the database", conversation.pk)
            row = None
        except dbpool.psycopg.Error as exc:
            raise dbpool.django_error(exc) from exc
        if row is not None:
            return _stored(conversation, user_message, reply, row[0], row[1], row[2])
    return await sync_to_async(released(sequence.insert_with_sequence))(
        conversation.pk, 2, lambda found: services.insert_exchange(conversation, content, client_id, found),
        from_database=numbers is not None)


async def _moderate(exchange: Exchange) -> None:
    """services._moderate: a rejected message ends as content_violation, its lock and key hold freed."""
    hook = getattr(settings, "MODERATION_HOOK", moderation.DEFAULT_HOOK)
    if hook == moderation.DEFAULT_HOOK:
        reason = moderation.check(exchange.user_message.content)  # a regex: no I/O
    else:  # another hook may call a service: not on the loop
        reason = await sync_to_async(moderation.check)(exchange.user_message.content)
    if reason is None:
        return
    await hotpath.finish_reply(exchange, status=Message.Status.CONTENT_VIOLATION, error_message=reason,
                               error_code="content_violation")
    await hotpath.release_lock(exchange)
    await _settle_unused(exchange.extra.get("key_hold"))


async def _settle_unused(hold: keylimits.Hold | None) -> None:
    if hold is not None:
        await keylimits.settle(hold, 0)


async def _release(lock: locks.GenerationLock) -> None:
    """locks.release on the async client; never raises (an unreleased lock expires)."""
    client = shared_redis.get_async_redis()
    try:
        if client is not None:
            lock_key, running_key = locks._keys(lock.owner_id, lock.conversation_id)
            await client.eval(locks._RELEASE, 2, lock_key, running_key, lock.token,
                              lock.conversation_id)
    except Exception:  # noqa: BLE001 - releasing must not mask the outcome; the lock expires anyway
        logger.exception("could not release the lock of conversation %s", lock.conversation_id)
