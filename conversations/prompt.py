"""What the model sees for a reply: the agent's personalised system prompt, relevant memory, and the
conversation's successful messages trimmed to the model's context window by token count (oldest out first).
"""

from __future__ import annotations

from typing import Any

from agents.llm import tokens
from agents.llm.agent_request import build_agent_request, render_system_prompt
from agents.llm.types import ChatRequest
from agents.models import Agent
from conversations import memory, selectors
from conversations.models import Conversation, Message


def _message_tokens(message: dict[str, Any], model: str) -> int:
    return tokens.count_messages([message], model) - tokens.REPLY_PRIMING_TOKENS


def output_reserve(agent: Agent) -> int:
    """Tokens kept free for the reply: the agent's max_tokens, else the model's, at most half the window."""
    wanted = agent.max_tokens or agent.model.max_output_tokens
    return min(wanted, agent.model.context_window // 2)


def build_request(*, conversation: Conversation, user_message: Message, user: Any) -> ChatRequest:
    """Sync (touches the database); call through sync_to_async from async code."""
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
    return request
