"""The statements of a chat turn's start on the async pool (conversations.turnstart), and rows back to models.

Each is one statement (data-modifying CTEs where it writes) with the same semantics as the ORM code of
services.create_conversation / begin_exchange and selectors.conversation_for it stands in for.
"""

from __future__ import annotations

import functools
from datetime import datetime, timedelta
from typing import Any, TypeVar

from django.conf import settings
from django.db import connection, connections
from django.db.models import Field, Model

from agents.models import Agent, LLMModel
from conversations.models import Conversation, GenerationLease, Message
from usage.models import ApiKey

M = TypeVar("M", bound=Model)


# The statements' text is built per turn: the names' quoting and column lists are memoised (`connection` is a
# proxy that looks the thread's connection up on every attribute, ~10 µs a name, 100+ names a turn).
@functools.cache
def q(name: str) -> str:
    return connection.ops.quote_name(name)


def table(model: type[Model]) -> str:
    return q(model._meta.db_table)


@functools.cache
def _fields(model: type[Model]) -> tuple[Field, ...]:
    return tuple(model._meta.concrete_fields)


@functools.cache
def columns(model: type[Model], alias: str = "") -> str:
    prefix = f"{alias}." if alias else ""
    return ", ".join(f"{prefix}{q(str(f.column))}" for f in _fields(model))


def width(model: type[Model]) -> int:
    return len(_fields(model))


def from_row(model: type[M], values: Any) -> M:
    """A model instance from its columns as `columns(model)` selected them (as the ORM would load it)."""
    return model.from_db("default", list(_attnames(model)), list(values))


@functools.cache
def _attnames(model: type[Model]) -> tuple[str, ...]:
    return tuple(f.attname for f in _fields(model))


def insert_values(obj: Model) -> tuple[list[str], list[Any]]:
    """The columns and values Django would INSERT for an unsaved instance (defaults, auto_now and all)."""
    names, values = [], []
    conn = connections["default"]
    for f in _fields(type(obj)):
        if f.primary_key:
            continue
        names.append(q(str(f.column)))
        values.append(f.get_db_prep_save(f.pre_save(obj, True), conn))
    return names, values


def _key_access(api_key: Any, model_column: str) -> tuple[str, list[Any]]:
    """SQL for services.key_allows_model: no key, a key without a model list, or a key listing the model."""
    if api_key is None or getattr(api_key, "pk", None) is None:
        return "true", []
    links = table(ApiKey.allowed_models.through)
    return (f"(NOT EXISTS (SELECT 1 FROM {links} WHERE apikey_id = %s) OR EXISTS (SELECT 1 FROM {links} "
            f"WHERE apikey_id = %s AND llmmodel_id = {model_column}))", [api_key.pk, api_key.pk])


def _replay_exists(conversation_column: str, client_id: str | None) -> tuple[str, list[Any]]:
    """Whether a user message was sent with this client_id (services._replay then answers; rare)."""
    if not client_id:
        return "false", []
    return (f"EXISTS (SELECT 1 FROM {table(Message)} WHERE conversation_id = {conversation_column} "
            f"AND client_id = %s AND role = %s)", [client_id, Message.Role.USER])


_AGENT_JOINS = (f"JOIN {table(LLMModel)} m ON m.id = a.model_id "
                f"LEFT JOIN {table(LLMModel)} f ON f.id = a.fallback_model_id")


def agent_from_row(values: Any) -> Agent:
    """The agent, its model and fallback model from `columns(Agent), columns(LLMModel) x2`."""
    n_agent, n_model = width(Agent), width(LLMModel)
    agent = from_row(Agent, values[:n_agent])
    agent.model = from_row(LLMModel, values[n_agent:n_agent + n_model])
    fallback = values[n_agent + n_model:n_agent + 2 * n_model]
    agent.fallback_model = from_row(LLMModel, fallback) if fallback[0] is not None else None
    return agent


def agent_statement(slug_or_id: str, api_key: Any, *, also: str = "") -> tuple[str, list[Any]]:
    """services.resolve_agent (an enabled agent by slug, else by id) and whether the key may use it.
    Row: agent, model, fallback model columns, then key access."""
    pk = int(slug_or_id) if slug_or_id.isdigit() and len(slug_or_id) < 19 else None
    access, access_params = _key_access(api_key, "a.model_id")
    sql = (f"SELECT {columns(Agent, 'a')}, {columns(LLMModel, 'm')}, {columns(LLMModel, 'f')}, "
           f"{access} AS allowed{also} FROM {table(Agent)} a {_AGENT_JOINS} "
           f"WHERE a.enabled AND (a.slug = %s OR a.id = %s) "
           f"ORDER BY (a.slug = %s) DESC LIMIT 1")
    return sql, [*access_params, slug_or_id, pk, slug_or_id]


def conversation_statement(*, user_id: int, conversation_id: int, api_key: Any,
                           client_id: str | None) -> tuple[str, list[Any]]:
    """selectors.conversation_for with the agent (and its models) loaded, whether the key may use the agent,
    and whether the client_id was sent before. Row: conversation, agent, model, fallback, access, replay."""
    access, access_params = _key_access(api_key, "a.model_id")
    replay, replay_params = _replay_exists("c.id", client_id)
    sql = (f"SELECT {columns(Conversation, 'c')}, {columns(Agent, 'a')}, {columns(LLMModel, 'm')}, "
           f"{columns(LLMModel, 'f')}, {access}, {replay} FROM {table(Conversation)} c "
           f"JOIN {table(Agent)} a ON a.id = c.agent_id {_AGENT_JOINS} "
           f"WHERE c.id = %s AND c.owner_id = %s AND c.deleted_at IS NULL")
    return sql, [*access_params, *replay_params, conversation_id, user_id]


def owned_statement(*, user_id: int, conversation_id: int) -> tuple[str, list[Any]]:
    """selectors.conversation_for, for a frame that only needs to know the conversation is the user's."""
    return (f"SELECT id FROM {table(Conversation)} WHERE id = %s AND owner_id = %s AND deleted_at IS NULL",
            [conversation_id, user_id])


def create_statement(conversation: Conversation, *, slug_or_id: str, api_key: Any, new: bool,
                     client_id: str | None, since: datetime) -> tuple[str, list[Any]]:
    """services.resolve_agent and create_conversation's check-then-insert in one statement (run under its advisory
    lock, in a transaction, when it checks): the agent as agent_statement picks it, if the key may use it, then the
    newest recent conversation with this agent and project (with `new`, only one the client_id was sent to), else
    a new one. Row: conversation columns, created, replay, then the agent, model and fallback model columns; no
    row (and nothing written) when there is no such agent or the key may not use it. `conversation` is the draft
    without its agent."""
    pick, pick_params = agent_statement(slug_or_id, api_key, also=", a.id AS picked_agent_id")
    agent_cte = f"WITH ag AS (SELECT * FROM ({pick}) pick WHERE pick.allowed)"
    names, values = insert_values(conversation)
    slots = ["%s"] * len(values)
    agent_slot = names.index(q(str(Conversation._meta.get_field("agent").column)))
    slots[agent_slot] = "(SELECT picked_agent_id FROM ag)"
    del values[agent_slot]
    insert = (f"INSERT INTO {table(Conversation)} ({', '.join(names)}) "
              f"SELECT {', '.join(slots)} WHERE EXISTS (SELECT 1 FROM ag) ")
    if new and not client_id:
        return (f"{agent_cte}, created AS ({insert} RETURNING {columns(Conversation)}) "
                f"SELECT {columns(Conversation, 'created')}, true, false, ag.* FROM created, ag"), \
            [*pick_params, *values]
    if new:
        match = (f"AND EXISTS (SELECT 1 FROM {table(Message)} WHERE conversation_id = c.id AND client_id = %s) "
                 f"ORDER BY c.updated_at DESC")
        match_params: list[Any] = [client_id]
    else:
        match, match_params = "ORDER BY c.created_at DESC", []
    replay, replay_params = _replay_exists("c.id", client_id)
    sql = (f"{agent_cte}, existing AS (SELECT {columns(Conversation, 'c')}, {replay} AS replay "
           f"FROM {table(Conversation)} c WHERE c.owner_id = %s AND c.agent_id = (SELECT picked_agent_id FROM ag) "
           f"AND c.project = %s AND c.deleted_at IS NULL AND c.created_at >= %s {match} LIMIT 1), "
           f"created AS ({insert} AND NOT EXISTS (SELECT 1 FROM existing) RETURNING {columns(Conversation)}) "
           f"SELECT {columns(Conversation, 'created')}, true, false, ag.* FROM created, ag "
           f"UNION ALL SELECT {columns(Conversation, 'existing')}, false, existing.replay, ag.* FROM existing, ag")
    params = [*pick_params, *replay_params, conversation.owner_id, conversation.project, since, *match_params,
              *values]
    return sql, params


def after_lock_statement(*, owner_id: int, conversation_id: int, client_id: str | None,
                         now: datetime) -> tuple[str, list[Any]]:
    """What begin_exchange reads once the Redis lock is taken, in one round trip: locks.running_in_db (live
    leases and recent `processing` replies of the owner), whether this conversation has a reply stuck past
    the lease (sweep_stuck_messages then ends it) and whether the client_id was answered meanwhile (replay)."""
    lease_cutoff = now - timedelta(seconds=settings.CONVERSATION_LOCK_SECONDS)
    replay, replay_params = _replay_exists("%s", client_id)
    messages = table(Message)
    sql = (f"SELECT ARRAY(SELECT conversation_id FROM {table(GenerationLease)} WHERE owner_id = %s "
           f"AND expires_at > %s UNION SELECT r.conversation_id FROM {messages} r "
           f"JOIN {table(Conversation)} c ON c.id = r.conversation_id WHERE c.owner_id = %s AND r.role = %s "
           f"AND r.status = %s AND r.updated_at > %s), "
           f"EXISTS (SELECT 1 FROM {messages} WHERE conversation_id = %s AND role = %s AND status = %s "
           f"AND updated_at < %s), {replay}")
    params = [owner_id, now, owner_id, Message.Role.ASSISTANT, Message.Status.PROCESSING, lease_cutoff,
              conversation_id, Message.Role.ASSISTANT, Message.Status.PROCESSING, lease_cutoff]
    if replay_params:
        params += [conversation_id, *replay_params]
    return sql, params


def _exchange_rows(user_message: Message, reply: Message,
                   user_message_id: str) -> tuple[list[str], list[Any], list[str], list[Any]]:
    """Both messages' columns and values for one INSERT each; the reply's `reply_to` is `user_message_id` (SQL for
    the user message's new id) instead of a parameter. Returns names, user values, reply slots, reply values."""
    names, user_values = insert_values(user_message)
    reply_names, reply_values = insert_values(reply)
    assert reply_names == names
    reply_to = names.index(q(Message._meta.get_field("reply_to").column))
    reply_slots = ["%s"] * len(names)
    reply_slots[reply_to] = user_message_id
    del reply_values[reply_to]
    return names, user_values, reply_slots, reply_values


def insert_statement(conversation: Conversation, user_message: Message, reply: Message,
                     title: str) -> tuple[str, list[Any]]:
    """services.insert_exchange: both messages (the reply answering the user message) and the conversation's
    counters, atomic as one statement. Row: user message id, reply id, the conversation's title."""
    names, user_values, reply_slots, reply_values = _exchange_rows(user_message, reply, "(SELECT id FROM um)")
    messages, now = table(Message), user_values[names.index(q("updated_at"))]
    sql = (f"WITH um AS (INSERT INTO {messages} ({', '.join(names)}) VALUES ({', '.join(['%s'] * len(names))}) "
           f"RETURNING id), "
           f"rp AS (INSERT INTO {messages} ({', '.join(names)}) VALUES ({', '.join(reply_slots)}) RETURNING id), "
           f"cv AS (UPDATE {table(Conversation)} SET message_count = message_count + 2, updated_at = %s, "
           f"title = CASE WHEN title = '' THEN %s ELSE title END WHERE id = %s RETURNING title) "
           f"SELECT (SELECT id FROM um), (SELECT id FROM rp), (SELECT title FROM cv)")
    return sql, [*user_values, *reply_values, now, title, conversation.pk]


def checked_insert_statement(conversation: Conversation, user_message: Message, reply: Message, title: str, *,
                             owner_id: int, client_id: str | None, now: datetime, running_in_redis: set[int],
                             max_running: int) -> tuple[str, list[Any]]:
    """What begin_exchange reads once the lock is taken (after_lock_statement) and, only if that lets the turn go
    on, insert_statement's writes: one statement, one round trip. The turn goes on when the conversation is not
    running by the database's account, the owner's running conversations (the database's and Redis's) are within
    `max_running`, no reply of it is stuck past its lease and its client_id was not answered meanwhile.
    Row: running conversation ids, stuck, replay, then user message id, reply id and the conversation's title
    (NULLs when nothing was written)."""
    check, check_params = after_lock_statement(owner_id=owner_id, conversation_id=conversation.pk,
                                               client_id=client_id, now=now)
    names, user_values, reply_slots, reply_values = _exchange_rows(user_message, reply, "um.id")
    messages, touched = table(Message), user_values[names.index(q("updated_at"))]
    columns_list = ", ".join(names)
    sql = (f"WITH chk(running, stuck, replay) AS ({check}), "
           f"ok AS (SELECT 1 FROM chk WHERE NOT (%s = ANY(chk.running)) AND cardinality(ARRAY("
           f"SELECT unnest(chk.running) UNION SELECT unnest(%s::bigint[]))) <= %s "
           f"AND NOT chk.stuck AND NOT chk.replay), "
           f"um AS (INSERT INTO {messages} ({columns_list}) SELECT {', '.join(['%s'] * len(names))} FROM ok "
           f"RETURNING id), "
           f"rp AS (INSERT INTO {messages} ({columns_list}) SELECT {', '.join(reply_slots)} FROM um RETURNING id), "
           f"cv AS (UPDATE {table(Conversation)} SET message_count = message_count + 2, updated_at = %s, "
           f"title = CASE WHEN title = '' THEN %s ELSE title END WHERE id = %s AND EXISTS (SELECT 1 FROM um) "
           f"RETURNING title) "
           f"SELECT chk.running, chk.stuck, chk.replay, (SELECT id FROM um), (SELECT id FROM rp), "
           f"(SELECT title FROM cv) FROM chk")
    params = [*check_params, conversation.pk, sorted(running_in_redis), max_running, *user_values, *reply_values,
              touched, title, conversation.pk]
    return sql, params
