"""The chat turn's agent (with its model and fallback model) from an in-process cache, read on the async pool.

Every chat turn needs its conversation's agent; read through the ORM it costs a query and a thread hop. Here a
hit is a dict lookup on the event loop and a miss is one statement on aiwriter.dbpool (the agent and both
models in one row). Saving or deleting an agent or a model clears this process's cache at once; other processes
see such a change within LLM_ROUTE_CACHE_SECONDS, the bound /v1's targets have (openai_compat.hotcache).

Cached agents are shared by concurrent turns: read them, never change them.
"""

from __future__ import annotations

import time
from typing import Any

from django.conf import settings
from django.db.models.signals import post_delete, post_save

from agents.models import Agent, LLMModel

MAX_ENTRIES = 10_000

_agents: dict[int, tuple[float, Agent]] = {}


def get(agent_id: int) -> Agent | None:
    entry = _agents.get(agent_id)
    if entry is None or entry[0] <= time.monotonic():
        return None
    return entry[1]


def put(agent: Agent) -> None:
    if len(_agents) >= MAX_ENTRIES:
        _agents.clear()
    _agents[agent.pk] = (time.monotonic() + settings.LLM_ROUTE_CACHE_SECONDS, agent)


def clear(*args: Any, **kwargs: Any) -> None:
    _agents.clear()


def _columns(model: type[Agent] | type[LLMModel]) -> tuple[list[str], list[str]]:
    fields = model._meta.concrete_fields
    return [f.attname for f in fields], [str(f.column) for f in fields]


def agent_statement(agent_id: int) -> tuple[str, list[Any]]:
    """The agent, its model and its fallback model (NULLs when it has none) as one row."""
    _, agent_cols = _columns(Agent)
    _, model_cols = _columns(LLMModel)
    select = ", ".join([f'a."{c}"' for c in agent_cols] + [f'm."{c}"' for c in model_cols]
                       + [f'f."{c}"' for c in model_cols])
    models = LLMModel._meta.db_table
    sql = (f'SELECT {select} FROM "{Agent._meta.db_table}" a INNER JOIN "{models}" m ON m.id = a.model_id '
           f'LEFT OUTER JOIN "{models}" f ON f.id = a.fallback_model_id WHERE a.id = %s')
    return sql, [agent_id]


def agent_from_row(row: tuple[Any, ...]) -> Agent:
    """The Agent of agent_statement's row, its model and fallback model loaded, as select_related loads them.
    (PostgreSQL hands back these fields' Python values as the ORM would: no converter applies to them.)"""
    agent_names, _ = _columns(Agent)
    model_names, _ = _columns(LLMModel)
    a, m = len(agent_names), len(model_names)
    agent = Agent.from_db("default", agent_names, list(row[:a]))
    agent.model = LLMModel.from_db("default", model_names, list(row[a:a + m]))
    fallback = row[a + m:a + 2 * m]
    agent.fallback_model = (LLMModel.from_db("default", model_names, list(fallback))
                            if fallback[0] is not None else None)
    return agent


for _model in (Agent, LLMModel):
    post_save.connect(clear, sender=_model, dispatch_uid=f"chat-agentcache-save-{_model.__name__}")
    post_delete.connect(clear, sender=_model, dispatch_uid=f"chat-agentcache-delete-{_model.__name__}")
