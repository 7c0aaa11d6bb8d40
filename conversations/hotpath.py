"""A chat turn's writes on the event loop: the heartbeat's checkpoint and the reply's final state as one statement
each on the async pool (PostgreSQL), and the conversation's lock extended and released without a thread hop.

`checkpoint` does what services.checkpoint does — the lease renewed (the Redis script on the async client, or the
lease row) and the text so far saved while the reply is still `processing` — with the lease row's update and the
text in one statement; its failure to save raises a django.db error like the sync one.

`finish_reply` writes what services.finish_reply writes — the reply's final state (only while it is still
`processing`: the first final state wins), its user message's status and the conversation's counters — as
one statement of data-modifying CTEs, atomic by itself, on aiwriter.dbpool: no thread hop, no BEGIN/COMMIT.
Elsewhere (SQLite, DB_ASYNC_POOL off, no free connection) and when the reply had already ended (a late cancel,
the sweeper: the stored state is read back) it is the sync service through sync_to_async.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from datetime import timedelta
from decimal import Decimal
from typing import Any

from asgiref.sync import sync_to_async
from django.db import DatabaseError, connection
from django.db.models import Field
from django.utils import timezone

from aiwriter import dbpool, deferred
from aiwriter import redis as shared_redis
from aiwriter.db import released
from conversations import locks, services
from conversations.models import Conversation, GenerationLease, Message
from conversations.services import Exchange

logger = logging.getLogger(__name__)


async def _to_the_end(coro: Any) -> Any:
    """Runs a write to its end even when the caller is cancelled meanwhile (a cancel frame, a disconnect right
    after the final frame), then lets the cancellation go on: a reply keeps its final state, a lock is freed.
    (The sync calls these replace ran on in their thread regardless; this also waits for them to finish.)"""
    task = asyncio.ensure_future(coro)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise


@functools.cache
def _q(name: str) -> str:
    return connection.ops.quote_name(name)


def _column(name: str) -> str:
    field = Message._meta.get_field(name)
    assert isinstance(field, Field) and field.column is not None
    return _q(field.column)


def finish_values(*, status: str, content: str = "", error_message: str = "", error_code: str = "",
                  model_name: str = "", provider_name: str = "", prompt_tokens: int = 0, completion_tokens: int = 0,
                  usage_estimated: bool = False, fallback: bool = False, latency_ms: int | None = None,
                  cost: Decimal = Decimal("0")) -> dict[str, Any]:
    """The reply's fields as services.finish_reply sets them (same truncation)."""
    return dict(status=status, content=content, error_message=error_message, error_code=error_code[:50],
                model_name=model_name[:100], provider_name=provider_name[:100], prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens, usage_estimated=usage_estimated, fallback=fallback,
                latency_ms=latency_ms, cost=cost)


def finish_statement(exchange: Exchange, values: dict[str, Any], now: Any) -> tuple[str, list[Any]]:
    """One statement: the reply (if still processing), then its user message and the conversation, only if the
    reply changed. Its row: (1 if the reply changed, else 0,)."""
    messages, conversations = _q(Message._meta.db_table), _q(Conversation._meta.db_table)
    sets = ", ".join(f"{_column(name)} = %s" for name in values)
    params: list[Any] = [now, *values.values(), exchange.reply.pk, Message.Status.PROCESSING]
    sql = (f"WITH r AS (UPDATE {messages} SET {_column('updated_at')} = %s, {sets} "
           f"WHERE id = %s AND {_column('status')} = %s RETURNING id), "
           # The user message shares the outcome, so failed exchanges stay out of later prompts.
           f"u AS (UPDATE {messages} SET {_column('status')} = %s, {_column('updated_at')} = %s "
           f"WHERE id = %s AND EXISTS (SELECT 1 FROM r)), ")
    params += [values["status"], now, exchange.user_message.pk]
    if values["status"] == Message.Status.SUCCESS:
        sql += (f"c AS (UPDATE {conversations} SET updated_at = %s, total_tokens = total_tokens + %s, "
                f"has_success = true WHERE id = %s AND EXISTS (SELECT 1 FROM r)) ")
        params += [now, values["prompt_tokens"] + values["completion_tokens"], exchange.conversation.pk]
    else:
        sql += f"c AS (UPDATE {conversations} SET updated_at = %s WHERE id = %s AND EXISTS (SELECT 1 FROM r)) "
        params += [now, exchange.conversation.pk]
    sql += "SELECT count(*) FROM r"
    return sql, params


async def finish_reply(exchange: Exchange, **fields: Any) -> Message:
    """services.finish_reply, on the async pool where it can (same rows; tests/test_chat_async_pool.py)."""
    if not dbpool.enabled():
        return await sync_to_async(released(services.finish_reply))(exchange, **fields)
    values = finish_values(**fields)
    now = timezone.now()
    sql, params = finish_statement(exchange, values, now)
    try:
        row = await _to_the_end(dbpool.fetchone(sql, params))
    except dbpool.PoolTimeout:
        logger.warning("async pool exhausted: reply %s ends through the sync path", exchange.reply.pk)
        return await sync_to_async(released(services.finish_reply))(exchange, **fields)
    except dbpool.psycopg.Error as exc:
        raise dbpool.django_error(exc) from exc
    reply = exchange.reply
    if not row or not row[0]:
        # Already final (a late cancel, the sweeper): the stored state stands; read it back.
        await sync_to_async(released(reply.refresh_from_db))()
        return reply
    for name, value in values.items():
        setattr(reply, name, value)
    reply.updated_at = now
    exchange.user_message.status = values["status"]
    return reply


def checkpoint_statement(exchange: Exchange, content: str, now: Any) -> tuple[str, list[Any]]:
    """services.save_partial (and, on a database lease, locks.extend's row update) as one statement."""
    messages = _q(Message._meta.db_table)
    sql = (f"UPDATE {messages} SET {_column('content')} = %s, {_column('updated_at')} = %s "
           f"WHERE id = %s AND {_column('status')} = %s")
    params: list[Any] = [content, now, exchange.reply.pk, Message.Status.PROCESSING]
    lock = exchange.lock
    if lock is not None and lock.backend != "redis":
        lease = (f"UPDATE {_q(GenerationLease._meta.db_table)} SET expires_at = %s "
                 f"WHERE conversation_id = %s AND token = %s")
        sql = f"WITH lease AS ({lease}) {sql}"
        params = [now + timedelta(seconds=locks._ttl_seconds()), lock.conversation_id, lock.token, *params]
    return sql, params


def _checkpoint_sync(exchange: Exchange, content: str) -> None:
    try:
        services.checkpoint(exchange, content)
    except DatabaseError:
        deferred.close_broken_connection()
        raise


async def checkpoint(exchange: Exchange, content: str) -> None:
    """services.checkpoint on the event loop: the Redis lease renewed on the async client (never raises), then one
    statement on the pool. The sync one through sync_to_async where the pool is off or busy."""
    if not dbpool.enabled():
        await sync_to_async(released(_checkpoint_sync))(exchange, content)
        return
    lock = exchange.lock
    if lock is not None and lock.backend == "redis":
        await _extend_redis(lock)
    sql, params = checkpoint_statement(exchange, content, timezone.now())
    try:
        await dbpool.fetchone(sql, params)
    except dbpool.PoolTimeout:
        logger.warning("async pool exhausted: the heartbeat of reply %s takes the sync path", exchange.reply.pk)
        await sync_to_async(released(_checkpoint_sync))(exchange, content)
    except dbpool.psycopg.Error as exc:
        raise dbpool.django_error(exc) from exc


async def _extend_redis(lock: locks.GenerationLock) -> None:
    """locks.extend's Redis branch on the async client; never raises (a lease not renewed may expire early)."""
    try:
        client = shared_redis.get_async_redis()
        if client is None:
            return
        lock_key, running_key = locks._keys(lock.owner_id, lock.conversation_id)
        await client.eval(locks._EXTEND, 2, lock_key, running_key, lock.token, locks._ttl_seconds() * 1000,
                          lock.conversation_id)
    except Exception:  # noqa: BLE001 - a failed extension only means the lock may expire early
        logger.exception("could not extend the lock of conversation %s", lock.conversation_id)


async def release_lock(exchange: Exchange) -> None:
    """services.release_lock without a thread hop: the compare-and-delete script on the async Redis client, or
    the lease row's delete on the pool. Never raises (an unreleased lock expires)."""
    lock, exchange.lock = exchange.lock, None
    if lock is None:
        return
    await _to_the_end(_release(lock))


async def _release(lock: locks.GenerationLock) -> None:
    try:
        if lock.backend == "redis":
            client = shared_redis.get_async_redis()
            if client is not None:
                lock_key, running_key = locks._keys(lock.owner_id, lock.conversation_id)
                await client.eval(locks._RELEASE, 2, lock_key, running_key, lock.token, lock.conversation_id)
        elif dbpool.enabled():
            await dbpool.fetchone(f"DELETE FROM {_q(GenerationLease._meta.db_table)} "
                                  f"WHERE conversation_id = %s AND token = %s", [lock.conversation_id, lock.token])
        else:
            await sync_to_async(released(locks.release))(lock)
    except Exception:  # noqa: BLE001 - releasing must not mask the outcome; the lock expires anyway
        logger.exception("could not release the lock of conversation %s", lock.conversation_id)
