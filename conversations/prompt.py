"""What the model sees for a reply: the agent's personalised system prompt, relevant memory, and the
conversation's successful messages trimmed to the model's context window by token count (oldest out first).
The reply's max_tokens is capped by the model's max_output_tokens and by the room the prompt leaves.
"""

from __future__ import annotations

from typing import Any

from agents.llm import tokens
from agents.llm.agent_request import build_agent_request, render_system_prompt
from agents.llm.types import ChatRequest
from agents.models import Agent
from conversations import memory, selectors, services
from conversations.models import Conversation, Message
from usage.pipeline import Target


def _message_tokens(message: dict[str, Any], model: str) -> int:
    return tokens.count_messages([message], model) - tokens.REPLY_PRIMING_TOKENS


def output_reserve(agent: Agent) -> int:
    """Tokens kept free for the reply: the agent's max_tokens (at most the model's max_output_tokens), else
    the model's, at most half the window."""
    cap = agent.model.max_output_tokens
    wanted = min(agent.max_tokens, cap) if agent.max_tokens and cap else agent.max_tokens or cap
    return min(wanted, agent.model.context_window // 2)


def build_request(*, conversation: Conversation, user_message: Message, user: Any,
                  api_key: Any = None) -> ChatRequest:
    """Sync (touches the database); call through sync_to_async from async code."""
    return build_call(conversation=conversation, user_message=user_message, user=user, api_key=api_key)[1]


def build_call(*, conversation: Conversation, user_message: Message, user: Any,
               api_key: Any = None) -> tuple[Target, ChatRequest]:
    """The reply's target (the conversation's agent, for the call pipeline) and its request. Sync (touches the
    database); call through sync_to_async from async code.

    A key limited to some models falls back only to one of them (as on /v1): else no fallback."""
    agent = Agent.objects.select_related("model", "fallback_model").get(pk=conversation.agent_id)
    model = agent.model.name
    budget = agent.model.context_window - output_reserve(agent)

    system = render_system_prompt(agent, user=user, project=conversation.project)
    hits = memory.search_memory(user=user, query=user_message.content, exclude_conversation_id=conversation.pk)
    with_memory = "\n\n".join(part for part in (system, memory.memory_prompt(hits) if hits else "") if part)
    new = {"role": "user", "content": user_message.content}

    used = tokens.count_messages(([{"role": "system", "content": with_memory}] if with_memory else []) + [new], model)
    if used > budget and hits:  # memory is the first thing to go when even the new message barely fits
        with_memory, hits = system, []
        used = tokens.count_messages(([{"role": "system", "content": system}] if system else []) + [new], model)

    kept: list[dict[str, Any]] = []
    for message in selectors.history_before(conversation=conversation, sequence=user_message.sequence):
        item = {"role": message.role, "content": message.content}
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
    if request.fallback_model and not services.key_allows_model(api_key, agent.fallback_model_id):
        request.fallback_model, fallback = None, None
    room = agent.model.context_window - used  # at least the reserve, unless the new message alone overflows
    if request.max_tokens and room > 0:
        request.max_tokens = min(request.max_tokens, room)
    return Target(name=f"agent:{agent.slug}", model=agent.model, agent=agent, fallback=fallback), request
