"""Turning a parsed request into a metered call: target, ChatRequest, request limits, key limits.

Shared by /v1 and the writer endpoints, so both route, limit and meter a call the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from asgiref.sync import sync_to_async

from agents.llm import tokens
from agents.llm.agent_request import build_agent_request
from agents.llm.types import ChatRequest, ChatResult
from aiwriter.db import released
from aiwriter.errors import ApiError
from openai_compat import hotcache
from openai_compat.targets import Target, resolve_target
from usage import keylimits
from usage.metering import CallContext


class ContextLengthExceeded(ApiError):
    status_code = 400
    code = "context_length_exceeded"
    message = "The messages are longer than the model's context window."


@dataclass
class PreparedCall:
    target: Target
    ctx: CallContext
    request: ChatRequest
    prompt_tokens: int | None  # counted only when a limit needed it
    hold: keylimits.Hold | None = None  # the key's TPM tokens held at admission, settled by finish_call


def build_request(target: Target, messages: list[dict[str, Any]], *, account: Any, project: str = "",
                  max_tokens: int | None = None, options: dict[str, Any] | None = None) -> ChatRequest:
    """The ChatRequest for a model or an agent, with the client's sampling options (temperature, top_p,
    stop, response_format, user) over the agent's; max_tokens is capped by the model's max_output_tokens.
    An agent falls back only to target.fallback (its fallback model, if the key may use it)."""
    if target.agent is not None:
        request = build_agent_request(target.agent, messages, user=account, project=project)
        request.fallback_model = target.fallback.name if target.fallback is not None else None
    else:
        request = ChatRequest(model=target.model.name, messages=messages)
    for name, value in (options or {}).items():
        if value is not None:
            setattr(request, name, value)
    if max_tokens is not None:
        request.max_tokens = max_tokens
    cap = target.model.max_output_tokens
    if cap and request.max_tokens:
        request.max_tokens = min(request.max_tokens, cap)
    return request


def _check_context(request: ChatRequest, target: Target, need_count: bool) -> int | None:
    """Counts the prompt when a limit needs it. A token is at least one character, so short prompts
    provably fit the context window without running the tokenizer."""
    chars = sum(len(m.get("content") or "") + len(m.get("name", "")) + len(str(m.get("tool_calls") or "")) + 8
                for m in request.messages) + 3 + len(str(request.tools or ""))
    window = target.model.context_window
    if not need_count and (not window or chars <= window):
        return None
    prompt_tokens = tokens.count_messages(request.messages, target.model.name)
    if window and prompt_tokens > window:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {window} tokens; the messages take {prompt_tokens}.")
    return prompt_tokens


async def prepare_call(*, account: Any, api_key: Any, model_name: str, messages: list[dict[str, Any]],
                       entry_point: str, max_tokens: int | None = None,
                       options: dict[str, Any] | None = None) -> PreparedCall:
    """Resolves the target (ModelNotFound if unknown or not allowed for the key), builds the request,
    checks the context window and the key's rate limits (KeyRateLimited). Makes one query, none when
    the target is in this process's cache (hotcache)."""
    target = hotcache.get_target(model_name, api_key)  # on the loop: no query, no thread hop
    if target is None:
        target = await sync_to_async(released(resolve_target))(model_name, api_key)
        hotcache.put_target(model_name, api_key, target)
    project = api_key.project if api_key is not None else ""
    request = build_request(target, messages, account=account, project=project, max_tokens=max_tokens,
                            options=options)
    prompt_tokens = _check_context(request, target, need_count=bool(api_key is not None and api_key.tpm))
    hold = await keylimits.acquire(api_key, prompt_tokens=prompt_tokens or 0,
                                   max_output_tokens=request.max_tokens or target.model.max_output_tokens or None)
    ctx = CallContext(user=account, entry_point=entry_point, api_key=api_key, project=project, agent=target.agent)
    return PreparedCall(target=target, ctx=ctx, request=request, prompt_tokens=prompt_tokens, hold=hold)


def tokens_used(call: PreparedCall, result: ChatResult | None, delivered: str = "") -> int:
    """Tokens to count against the key's TPM: the call's usage, or an estimate for a cut-off stream."""
    if result is not None:
        return result.usage.total_tokens
    prompt = call.prompt_tokens
    if prompt is None:
        prompt = tokens.count_messages(call.request.messages, call.target.model.name)
    return prompt + tokens.count_text(delivered, call.target.model.name)


async def finish_call(call: PreparedCall, result: ChatResult | None, delivered: str = "") -> None:
    """The tokens the call used replace its hold on the key's TPM (once; later calls do nothing)."""
    if call.ctx.api_key is None or not call.ctx.api_key.tpm or (call.hold is not None and call.hold.settled):
        return
    used = tokens_used(call, result, delivered)
    if call.hold is not None:
        await keylimits.settle(call.hold, used)
    else:  # admitted without a hold (Redis was down): count what it used all the same
        await keylimits.record_tokens(call.ctx.api_key, used)


async def refused_call(call: PreparedCall) -> None:
    """Metering refused the call before the model was asked (balance, quota, key budget): no tokens used.
    A call that ends any other unforeseen way keeps its hold until its window ends (the safe side)."""
    await keylimits.settle(call.hold, 0)
