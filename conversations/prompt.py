"""What the model sees for a reply: the agent's personalised system prompt, relevant memory, and the
conversation's successful messages trimmed to the model's context window by token count (oldest out first).
The reply's max_tokens is capped by the model's max_output_tokens and by the room the prompt leaves.

Two builds, one trimming (`assemble`): `build_prompt` reads through the ORM (sync); `build_prompt_async` reads on
the async pool without a thread hop (PostgreSQL) and falls back to the sync one elsewhere.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from asgiref.sync import sync_to_async

from agents.llm import tokens
from agents.llm.agent_request import build_agent_request, render_system_prompt
from agents.llm.types import ChatRequest
from agents.models import Agent
from aiwriter import dbpool
from aiwriter.db import released
from aiwriter.observability import add_db_query
from conversations import agentcache, memory, selectors, services
from conversations.models import Conversation, Message
from usage.models import ApiKey
from usage.pipeline import Target

logger = logging.getLogger(__name__)


def _message_tokens(message: dict[str, Any], model: str) -> int:
    return tokens.count_messages([message], model) - tokens.REPLY_PRIMING_TOKENS


def output_reserve(agent: Agent) -> int:
    """Tokens kept free for the reply: the agent's max_tokens (at most the model's max_output_tokens), else
    the model's, at most half the window."""
    cap = agent.model.max_output_tokens
    wanted = min(agent.max_tokens, cap) if agent.max_tokens and cap else agent.max_tokens or cap
    return min(wanted, agent.model.context_window // 2)


@dataclass
class BuiltPrompt:
    target: Target  # the conversation's agent, for the call pipeline
    request: ChatRequest
    prompt_tokens: int  # the request's messages, counted while trimming (tokens.count_messages)


def load_agent(agent_id: int) -> Agent:
    """Sync: the agent with its model and fallback model."""
    return Agent.objects.select_related("model", "fallback_model").get(pk=agent_id)


def build_prompt(*, conversation: Conversation, user_message: Message, user: Any,
                 api_key: Any = None) -> BuiltPrompt:
    """The reply's target (the conversation's agent, for the call pipeline) and its request, read through the ORM
    (SQLite, the pool off or busy). Sync: from async code, call build_prompt_async."""
    agent = load_agent(conversation.agent_id)
    hits = memory.search_memory(user=user, query=user_message.content, exclude_conversation_id=conversation.pk)
    history = [(m.role, m.content)
               for m in selectors.history_before(conversation=conversation, sequence=user_message.sequence)]
    fallback_allowed = agent.fallback_model_id is None or services.key_allows_model(api_key, agent.fallback_model_id)
    return assemble(agent=agent, conversation=conversation, user_message=user_message, user=user, hits=hits,
                    history=history, fallback_allowed=fallback_allowed)


def assemble(*, agent: Agent, conversation: Conversation, user_message: Message, user: Any,
             hits: list[memory.MemoryHit], history: Iterable[tuple[str, str]],
             fallback_allowed: bool) -> BuiltPrompt:
    """The request from what was read: memory hits (best first) and history (newest first), trimmed to the
    window by tokens. No query. A key limited to some models falls back only to one of them (as on /v1)."""
    model = agent.model.name
    budget = agent.model.context_window - output_reserve(agent)

    system = render_system_prompt(agent, user=user, project=conversation.project)
    with_memory = "\n\n".join(part for part in (system, memory.memory_prompt(hits) if hits else "") if part)
    new = {"role": "user", "content": user_message.content}

    used = tokens.count_messages(([{"role": "system", "content": with_memory}] if with_memory else []) + [new], model)
    if used > budget and hits:  # memory is the first thing to go when even the new message barely fits
        with_memory, hits = system, []
        used = tokens.count_messages(([{"role": "system", "content": system}] if system else []) + [new], model)

    kept: list[dict[str, Any]] = []
    for role, content in history:
        item = {"role": role, "content": content}
        cost = _message_tokens(item, model)
        if used + cost > budget:
            break
        kept.append(item)
        used += cost
    kept.reverse()

    request = build_agent_request(agent, [*kept, new], user=user, project=conversation.project)
    if hits:
        if request.messages and request.messages[0]["role"] == "system":
            request.messages[0] = {"role": "system", "content": with_memory}
        else:
            request.messages.insert(0, {"role": "system", "content": with_memory})
    fallback = agent.fallback_model
    if request.fallback_model and not fallback_allowed:
        request.fallback_model, fallback = None, None
    room = agent.model.context_window - used  # at least the reserve, unless the new message alone overflows
    if request.max_tokens and room > 0:
        request.max_tokens = min(request.max_tokens, room)
    target = Target(name=f"agent:{agent.slug}", model=agent.model, agent=agent, fallback=fallback)
    return BuiltPrompt(target=target, request=request, prompt_tokens=used)


# --- the build on the event loop (PostgreSQL's async pool) ----------------------------------------------------

async def build_prompt_async(*, conversation: Conversation, user_message: Message, user: Any,
                             api_key: Any = None, prefetched: Prefetched | None = None) -> BuiltPrompt:
    """build_prompt without a thread hop: the agent from the in-process cache (conversations.agentcache), then
    the memory search, the history and the key's fallback check (and the agent, on a cache miss) as one round
    trip on aiwriter.dbpool (pipeline mode); the same trimming. Elsewhere (SQLite, DB_ASYNC_POOL off, no free
    connection) it is the sync build through sync_to_async. tests/test_chat_prompt_pool.py: both builds agree."""
    kwargs = dict(conversation=conversation, user_message=user_message, user=user, api_key=api_key)
    if not dbpool.enabled():
        return await sync_to_async(released(build_prompt))(**kwargs)
    try:
        return await _build_on_pool(**kwargs, prefetched=prefetched)
    except dbpool.PoolTimeout:
        logger.warning("async pool exhausted: the prompt of reply to %s is built through the sync path",
                       user_message.pk)
        return await sync_to_async(released(build_prompt))(**kwargs)
    except dbpool.psycopg.Error as exc:
        raise dbpool.django_error(exc) from exc


def history_statement(conversation_id: int, sequence: int) -> tuple[str, list[Any]]:
    """selectors.history_before as SQL: (role, content) of the successful user/assistant messages before
    `sequence`, newest first, at most HISTORY_SCAN_LIMIT."""
    sql = (f'SELECT role, content FROM "{Message._meta.db_table}" WHERE conversation_id = %s '
           f"AND role IN (%s, %s) AND sequence < %s AND status = %s ORDER BY sequence DESC LIMIT %s")
    return sql, [conversation_id, Message.Role.USER, Message.Role.ASSISTANT, sequence, Message.Status.SUCCESS,
                 selectors.HISTORY_SCAN_LIMIT]


def key_allows_statement(api_key_id: int, model_id: int | None, agent_id: int) -> tuple[str, list[Any]]:
    """services.key_allows_model as SQL: true unless the key is limited to some models and the fallback model
    (`model_id`, or the agent's own when the agent is not cached) is not one of them."""
    links = ApiKey.allowed_models.through._meta.db_table
    model = "%s" if model_id is not None else f'(SELECT fallback_model_id FROM "{Agent._meta.db_table}" WHERE id = %s)'
    sql = (f'SELECT NOT EXISTS (SELECT 1 FROM "{links}" WHERE apikey_id = %s) '
           f'OR EXISTS (SELECT 1 FROM "{links}" WHERE apikey_id = %s AND llmmodel_id = {model})')
    return sql, [api_key_id, api_key_id, model_id if model_id is not None else agent_id]


async def _build_on_pool(*, conversation: Conversation, user_message: Message, user: Any,
                         api_key: Any, prefetched: Prefetched | None = None) -> BuiltPrompt:
    agent_id = conversation.agent_id
    rows: dict[str, list[tuple[Any, ...]]] = {}
    agent = prefetched.agent if prefetched is not None else agentcache.get(agent_id)
    side = await prefetched.side_rows() if prefetched is not None else None
    if side is not None:
        rows.update(side)
    statements: dict[str, tuple[str, list[Any]]] = {}
    if agent is None:
        statements["agent"] = agentcache.agent_statement(agent_id)
    if prefetched is not None and prefetched.history is not None:
        rows["history"] = prefetched.history
    else:
        statements["history"] = history_statement(conversation.pk, user_message.sequence)
    if side is None:
        statements.update(side_statements(conversation=conversation, content=user_message.content, user=user,
                                          api_key=api_key, agent=agent))
    if statements:
        rows.update(await _fetch_pipelined(statements))
    if agent is None:
        if not rows["agent"]:
            raise Agent.DoesNotExist(f"Agent {agent_id} does not exist.")
        agent = agentcache.agent_from_row(rows["agent"][0])
        agentcache.put(agent)
    fallback_allowed = agent.fallback_model_id is None or "key" not in rows or bool(rows["key"][0][0])
    return assemble(agent=agent, conversation=conversation, user_message=user_message, user=user,
                    hits=memory.hits_from_rows(rows.get("memory", [])), history=rows["history"],
                    fallback_allowed=fallback_allowed)


def side_statements(*, conversation: Conversation, content: str, user: Any, api_key: Any,
                    agent: Agent | None) -> dict[str, tuple[str, list[Any]]]:
    """The reads of a prompt that do not depend on the conversation's messages: the memory search (its other
    conversations) and whether the key may use the agent's fallback model (`agent` None: not known yet)."""
    statements: dict[str, tuple[str, list[Any]]] = {}
    search = memory.search_statement(user_id=user.pk, query=content, exclude_conversation_id=conversation.pk)
    if search is not None:
        statements["memory"] = search
    key_id = getattr(api_key, "pk", None)
    if key_id is not None and (agent is None or agent.fallback_model_id is not None):
        statements["key"] = key_allows_statement(key_id, agent.fallback_model_id if agent else None,
                                                 conversation.agent_id)
    return statements


class Prefetched:
    """A prompt's reads made while the websocket turn began (conversations.turnstart), so the first delta does not
    wait for them: the memory search and the key's fallback check from the moment the conversation is known (on
    a connection of their own, alongside the lock and the insert), and the history with the reads after the lock
    (every message before the new one is in its final state by then, and the new one is not yet stored).

    `agent` is the conversation's agent as the turn read it (with its models), fresher than agentcache's."""

    def __init__(self, *, conversation: Conversation, content: str, user: Any, api_key: Any,
                 also: dict[str, tuple[str, list[Any]]] | None = None,
                 on_read: Callable[[dict[str, list[tuple[Any, ...]]]], None] | None = None) -> None:
        """`also`: the turn's other reads to make in the same round trip; `on_read` gets every row once read."""
        self.agent: Agent | None = _loaded_agent(conversation) or agentcache.get(conversation.agent_id)
        self.history: list[tuple[Any, ...]] | None = None  # set by the turn once read after the lock
        statements = {**side_statements(conversation=conversation, content=content, user=user, api_key=api_key,
                                        agent=self.agent), **(also or {})}
        self._side: asyncio.Future | None = (asyncio.ensure_future(_read_ahead(statements, on_read))
                                             if statements else None)

    async def side_rows(self) -> dict[str, list[tuple[Any, ...]]] | None:
        """The memory and key rows; None when their read failed (the build then makes it itself)."""
        if self._side is None:
            return {}
        # Shielded: a cancelled build leaves the read to finish (its connection goes back to the pool whole).
        return await asyncio.shield(self._side)

    async def settle(self) -> None:
        """Waits for the reads ahead (a turn that ends before its call): nothing is left running behind it."""
        if self._side is not None:
            await asyncio.shield(self._side)


def _loaded_agent(conversation: Conversation) -> Agent | None:
    """The conversation's agent if it was loaded with its models (turnsql's rows), else None."""
    agent = Conversation._meta.get_field("agent").get_cached_value(conversation, None)
    if not isinstance(agent, Agent) or not Agent._meta.get_field("model").is_cached(agent):
        return None
    return agent


async def _read_ahead(statements: dict[str, tuple[str, list[Any]]],
                      on_read: Callable[[dict[str, list[tuple[Any, ...]]]], None] | None,
                      ) -> dict[str, list[tuple[Any, ...]]] | None:
    try:
        rows = await _fetch_pipelined(statements)
    except (dbpool.PoolTimeout, dbpool.psycopg.Error) as exc:
        logger.warning("prompt reads ahead of the turn failed (%r); the build reads again", exc)
        return None
    if on_read is not None:
        try:
            on_read(rows)
        except Exception:  # noqa: BLE001 - what it warms is read again where it is needed
            logger.exception("a read ahead of the turn could not be used")
    return rows


async def _fetch_pipelined(statements: dict[str, tuple[str, list[Any]]]) -> dict[str, list[tuple[Any, ...]]]:
    """Every statement's rows, sent together on one pooled connection: one round trip."""
    started = time.perf_counter()
    try:
        async with dbpool.connection() as conn:
            async with conn.pipeline():
                cursors = {name: await conn.execute(sql, params) for name, (sql, params) in statements.items()}
            return {name: await cursor.fetchall() for name, cursor in cursors.items()}
    finally:
        elapsed = (time.perf_counter() - started) * 1000
        for _ in statements:
            add_db_query(elapsed / len(statements))
