"""Data passed across the AI service layer's boundary. Shared contract: change with care."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from agents.llm import errors

TokenSource = Literal["measured", "estimated", "partial"]


@dataclass
class ChatRequest:
    """What a caller asks for. `model` is a public model name (agents.LLMModel.name)."""

    model: str
    messages: list[dict[str, Any]]  # OpenAI format: {"role": ..., "content": str}
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: list[str] | str | None = None
    response_format: dict[str, Any] | None = None
    user: str | None = None
    # Function calling, passed through to OpenAI-compatible upstreams as given (the demo provider refuses them).
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    # Timeout for the primary model: to first token for streams, in total for whole replies.
    timeout: float | None = None
    fallback_model: str | None = None
    # None = cache only deterministic requests (temperature 0); True/False forces it.
    cache: bool | None = None
    # Sent to OpenAI-compatible upstreams as extra body fields (e.g. {"seed": 1}); part of the cache key.
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    source: TokenSource = "measured"

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def estimated(self) -> bool:
        return self.source != "measured"

    def as_dict(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "estimated": self.estimated,
        }


@dataclass
class Attempt:
    provider: str
    deployment_id: int | None
    upstream_model: str
    model: str
    ok: bool
    error_code: str = ""
    latency_ms: int = 0


@dataclass
class ChatResult:
    """The outcome of a call: always carries usage, even for a failed or cut-off one."""

    content: str
    usage: Usage
    model: str  # public model name that served the reply (the fallback's when fallback=True)
    provider: str = ""
    deployment_id: int | None = None
    upstream_model: str = ""
    finish_reason: str | None = "stop"
    latency_ms: int = 0
    ttft_ms: int | None = None
    cache_hit: bool = False
    fallback: bool = False
    fallback_reason: str = ""
    attempts: list[Attempt] = field(default_factory=list)
    # The function calls the model asked for (OpenAI's message.tool_calls), when it asked for any.
    tool_calls: list[dict[str, Any]] | None = None


@dataclass
class Served:
    """Who serves a stream. Settled when its first text reaches the caller: no retry or fallback after that."""

    provider: str
    deployment_id: int | None = None
    model: str = ""  # public model name (the fallback's when fallback=True)
    fallback: bool = False
    cache_hit: bool = False


@dataclass
class TextDelta:
    """One piece of streamed text. The last item of a stream is a ChatResult, never a TextDelta."""

    content: str
    # Set by the service on the first piece a caller receives (e.g. for a stream's response headers).
    served: Served | None = None
    # The upstream's own finish_reason, on the piece that carried it (usually one with empty text).
    finish_reason: str | None = None
    # Pieces of function calls as the upstream streamed them (OpenAI's delta.tool_calls: index, id, name, a slice
    # of the arguments); passed on as they come, and merged into ChatResult.tool_calls at the end.
    tool_calls: list[dict[str, Any]] | None = None


class LLMError(Exception):
    """A call that failed for good. Its code decides what every entry point answers (agents/llm/errors.py)."""

    code: str = "llm_error"
    message: str
    # What arrived before the failure, with usage (source="partial"); set by the service layer.
    partial: ChatResult | None
    retry_after: float | None  # seconds, from the upstream's Retry-After
    # A deployment-specific refusal (its key or upstream model): another deployment of the model may serve.
    failover: bool
    # The caller's time budget is spent (not one deployment's): no retry on this model, only the fallback.
    deadline: bool
    # The usage.UsageRecord that metering wrote for the failed call. Any: this layer can't import usage.
    usage_record: Any

    def __init__(self, message: str, *, code: str | None = None, partial: ChatResult | None = None,
                 retry_after: float | None = None, failover: bool = False, deadline: bool = False) -> None:
        super().__init__(message)
        self.message = message
        if code:
            self.code = code
        self.partial = partial
        self.retry_after = retry_after
        self.failover = failover
        self.deadline = deadline
        self.usage_record = None

    @property
    def http_status(self) -> int:
        return errors.spec(self.code).http_status

    @property
    def retryable(self) -> bool:
        return errors.spec(self.code).retryable


class UpstreamTimeout(LLMError):
    code = "upstream_timeout"


class RateLimited(LLMError):
    code = "rate_limited"


class BadUpstreamRequest(LLMError):
    """The upstream refused the request itself (4xx): never retried."""

    code = "bad_request"


class ModelNotFound(LLMError):
    code = "model_not_found"


class NoHealthyDeployment(LLMError):
    code = "no_healthy_deployment"
