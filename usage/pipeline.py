"""One call pipeline for every entry point: prepare → metered run → finish.

- `prepare` builds the call for a target (a model, or an agent with its fallback): the ChatRequest with the
  client's sampling options and max_tokens capped by the model, the context-window check, the key's limits
  (its TPM hold) and the metering context; `prepare_request` is the same for a request the entry point built
  itself (chat: history trimmed to the window, memory), whose key limits were taken when its turn began;
- `run_stream` / `run_complete` run it metered (usage.metering: hold, record, charge);
- `finish` settles the key's TPM hold with what the call used (`refused` when metering refused it;
  `finish_counted` with a count the entry point already has, as chat's reply from its usage record).

Chat (conversations.generation), /v1 and the writer (openai_compat.calls) and staff debug runs (usage.debug)
all go through it. Which target a name means is the entry point's business (openai_compat.targets for /v1 and
the writer; the conversation's agent for chat): this layer imports nothing above billing.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from agents.llm import tokens
from agents.llm.agent_request import build_agent_request
from agents.llm.types import ChatRequest, ChatResult, LLMError, TextDelta
from agents.models import Agent, LLMModel
from aiwriter.errors import ApiError
from usage import keylimits
from usage.metering import CallContext, MeteredResult, metered_complete, metered_stream


class ContextLengthExceeded(ApiError):
    status_code = 400
    code = "context_length_exceeded"
    message = "The messages are longer than the model's context window."


@dataclass
class Target:
    name: str  # as the client wrote it
    model: LLMModel  # the model that serves it (an agent's primary model)
    agent: Agent | None = None
    fallback: LLMModel | None = None  # the agent's fallback model, when there is one and the key may use it

    @classmethod
    def for_agent(cls, agent: Agent) -> Target:
        """An agent called with no key restricting it (staff debug runs): its own fallback model."""
        return cls(name=f"agent:{agent.slug}", model=agent.model, agent=agent, fallback=agent.fallback_model)


@dataclass
class PreparedCall:
    target: Target
    ctx: CallContext
    request: ChatRequest
    prompt_tokens: int | None  # counted only when a limit needed it
    hold: keylimits.Hold | None = None  # the key's TPM tokens held at admission, settled by finish


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


def check_context(request: ChatRequest, target: Target, need_count: bool) -> int | None:
    """Counts the prompt when a limit needs it. A token is at least one character, so short prompts
    provably fit the context window without running the tokenizer."""
    chars = sum(len(m.get("content") or "") + len(m.get("name", "")) + len(str(m.get("tool_calls") or "")) + 8
                for m in request.messages) + 3 + len(str(request.tools or ""))
    window = target.model.context_window
    if not need_count and (not window or chars <= window):
        return None
    return _within_window(tokens.count_messages(request.messages, target.model.name), target)


def _within_window(prompt_tokens: int, target: Target) -> int:
    window = target.model.context_window
    if window and prompt_tokens > window:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {window} tokens; the messages take {prompt_tokens}.")
    return prompt_tokens


async def prepare(target: Target, messages: list[dict[str, Any]], *, account: Any, api_key: Any, entry_point: str,
                  max_tokens: int | None = None, options: dict[str, Any] | None = None,
                  debug: bool = False) -> PreparedCall:
    """The request, the context-window check (ContextLengthExceeded) and the key's rate limits (KeyRateLimited),
    with the metering context. No query."""
    project = api_key.project if api_key is not None else ""
    request = build_request(target, messages, account=account, project=project, max_tokens=max_tokens,
                            options=options)
    prompt_tokens = check_context(request, target, need_count=bool(api_key is not None and api_key.tpm))
    hold = await keylimits.acquire(api_key, prompt_tokens=prompt_tokens or 0,
                                   max_output_tokens=request.max_tokens or target.model.max_output_tokens or None)
    ctx = CallContext(user=account, entry_point=entry_point, api_key=api_key, project=project, agent=target.agent,
                      debug=debug)
    return PreparedCall(target=target, ctx=ctx, request=request, prompt_tokens=prompt_tokens, hold=hold)


def prepare_request(target: Target, request: ChatRequest, *, account: Any, api_key: Any, entry_point: str,
                    project: str = "", hold: keylimits.Hold | None = None, prompt_tokens: int | None = None,
                    conversation: Any = None, message: Any = None) -> PreparedCall:
    """`prepare` for a prebuilt request: the context-window check (ContextLengthExceeded) and the metering context
    (with the conversation and reply it is for). The key's limits were admitted by the caller: `hold` is what
    that took (None: nothing held). `prompt_tokens`, when the caller counted the messages already, spares the
    tokenizer. No query."""
    if prompt_tokens is None:
        prompt_tokens = check_context(request, target, need_count=False)
    else:
        _within_window(prompt_tokens, target)
    ctx = CallContext(user=account, entry_point=entry_point, api_key=api_key, project=project, agent=target.agent,
                      conversation=conversation, message=message)
    return PreparedCall(target=target, ctx=ctx, request=request, prompt_tokens=prompt_tokens, hold=hold)


def run_stream(call: PreparedCall) -> AsyncGenerator[TextDelta | MeteredResult, None]:
    """The call, metered, as it streams: TextDeltas, then one MeteredResult."""
    return metered_stream(call.ctx, call.request)


async def run_complete(call: PreparedCall) -> MeteredResult:
    """The call, metered, as one reply; its key-limit hold settled whatever the outcome."""
    try:
        metered = await metered_complete(call.ctx, call.request)
    except LLMError as exc:
        await finish(call, exc.partial)
        raise
    except ApiError:
        await refused(call)
        raise
    await finish(call, metered.result)
    return metered


def tokens_used(call: PreparedCall, result: ChatResult | None, delivered: str = "") -> int:
    """Tokens to count against the key's TPM: the call's usage, or an estimate for a cut-off stream."""
    if result is not None:
        return result.usage.total_tokens
    prompt = call.prompt_tokens
    if prompt is None:
        prompt = tokens.count_messages(call.request.messages, call.target.model.name)
    return prompt + tokens.count_text(delivered, call.target.model.name)


async def settle_tokens(api_key: Any, hold: keylimits.Hold | None, used: int) -> None:
    """`used` tokens replace the key's TPM hold (once; a settled hold is left alone); admitted without a hold
    (Redis was down), they are counted all the same."""
    if api_key is None or not api_key.tpm or (hold is not None and hold.settled):
        return
    if hold is not None:
        await keylimits.settle(hold, used)
    else:
        await keylimits.record_tokens(api_key, used)


async def finish(call: PreparedCall, result: ChatResult | None, delivered: str = "") -> None:
    """The tokens the call used replace its hold on the key's TPM (once; later calls do nothing)."""
    if call.ctx.api_key is None or not call.ctx.api_key.tpm or (call.hold is not None and call.hold.settled):
        return
    await settle_tokens(call.ctx.api_key, call.hold, tokens_used(call, result, delivered))


async def finish_counted(call: PreparedCall, used: int) -> None:
    """`finish` with the tokens the entry point counted itself (chat: its reply's, as the usage record has them)."""
    await settle_tokens(call.ctx.api_key, call.hold, used)


async def refused(call: PreparedCall) -> None:
    """Metering refused the call before the model was asked (balance, quota, key budget): no tokens used.
    A call that ends any other unforeseen way keeps its hold until its window ends (the safe side)."""
    await keylimits.settle(call.hold, 0)
