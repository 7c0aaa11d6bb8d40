"""Turn an Agent plus a conversation's messages into a ChatRequest."""

from __future__ import annotations

from typing import Any

from django.utils import timezone

from agents.llm.types import ChatRequest
from agents.models import Agent


class _SafeFormat(dict[str, Any]):
    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def render_system_prompt(agent: Agent, *, user: Any = None, project: str = "") -> str:
    """Fills {user}, {project}, {date}; unknown braces stay as written."""
    username = getattr(user, "get_username", lambda: "")() if user is not None else ""
    values = _SafeFormat(user=username, project=project, date=timezone.localdate().isoformat())
    try:
        return agent.system_prompt.format_map(values)
    except (ValueError, IndexError):  # stray braces in an operator's prompt
        return agent.system_prompt


def build_agent_request(agent: Agent, messages: list[dict[str, Any]], *, user: Any = None, project: str = "",
                        **options: Any) -> ChatRequest:
    """`agent.model` and `agent.fallback_model` must be loaded (select_related) by the caller in async code.

    max_tokens (the agent's, or an option over it) is capped by the model's max_output_tokens, as on /v1."""
    system = render_system_prompt(agent, user=user, project=project)
    full = ([{"role": "system", "content": system}] if system else []) + [
        m for m in messages if m.get("role") != "system"
    ]
    request = ChatRequest(
        model=agent.model.name,
        messages=full,
        temperature=float(agent.temperature),
        max_tokens=agent.max_tokens,
        timeout=float(agent.timeout_seconds),
        fallback_model=agent.fallback_model.name if agent.fallback_model is not None else None,
    )
    for name, value in options.items():
        if value is not None:
            setattr(request, name, value)
    cap = agent.model.max_output_tokens
    if cap and request.max_tokens:
        request.max_tokens = min(request.max_tokens, cap)
    return request
