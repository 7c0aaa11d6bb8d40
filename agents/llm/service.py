"""The one entry point to the AI service layer.

    result = await complete(ChatRequest(model="demo-chat", messages=[...]))
    async for item in stream(request):   # TextDelta..., then one ChatResult
        ...

Per call: response cache → the model's deployments (balancer among the healthy ones whose breaker and
rate limits allow) → retries with backoff on retryable errors, preferring another deployment → on a
timeout (request.timeout: to the first token for streams, in total for whole replies) or when the
model keeps failing, the request.fallback_model. Failures raise LLMError; once text has reached the
caller nothing is retried and the error's `.partial` holds that text with usage (source="partial").
Each concern lives in its own module: registry, balancer, breaker, health, ratelimit, retry, cache,
metrics, clients.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import AsyncGenerator, Set
from contextlib import aclosing
from dataclasses import replace
from typing import Any

from django.conf import settings

from agents.llm import (
    balancer,
    breaker,
    cache,
    clients,
    health,
    metrics,
    ratelimit,
    registry,
    retry,
    tokens,
)
from agents.llm.registry import DeploymentInfo, ModelRoute
from agents.llm.types import (
    Attempt,
    BadUpstreamRequest,
    ChatRequest,
    ChatResult,
    LLMError,
    NoHealthyDeployment,
    RateLimited,
    Served,
    TextDelta,
    UpstreamTimeout,
    Usage,
)
from aiwriter import redis_guard

MAX_ATTEMPTS = 10


def _ms(since: float) -> int:
    return int((time.monotonic() - since) * 1000)


class _Call:
    """Book-keeping of one call across its attempts and models."""

    def __init__(self, request: ChatRequest, whole: bool) -> None:
        self.request = request
        self.whole = whole
        self.started = time.monotonic()
        self.attempts: list[Attempt] = []
        self.delivered = False  # a delta reached the caller: no retry, no fallback from here on
        self.ttft_ms: int | None = None
        self._prompt_tokens: int | None = None

    def prompt_tokens(self, upstream_model: str = "") -> int:
        if self._prompt_tokens is None:
            self._prompt_tokens = tokens.count_messages(self.request.messages, upstream_model)
        return self._prompt_tokens


# --- entry points ---------------------------------------------------------------------------

async def stream(request: ChatRequest, *, whole: bool = False) -> AsyncGenerator[TextDelta | ChatResult, None]:
    """TextDelta items, then exactly one ChatResult. Raises LLMError.

    whole=True is complete() as a generator (for callers that meter, drain or close it): no TextDelta, only
    the ChatResult; request.timeout bounds the primary model's total time, and a reply cut midway is retried
    since nothing reached the caller yet.
    """
    async with aclosing(_run(request, whole=whole)) as items:
        async for item in items:
            yield item


async def complete(request: ChatRequest) -> ChatResult:
    """The whole reply. request.timeout bounds the primary model's total time. Raises LLMError."""
    result = None
    async with aclosing(_run(request, whole=True)) as items:
        async for item in items:
            result = item
    assert isinstance(result, ChatResult)
    return result


# --- the call -------------------------------------------------------------------------------

async def _run(request: ChatRequest, *, whole: bool) -> AsyncGenerator[TextDelta | ChatResult, None]:
    """_serve, counted once in the total metrics however many models it went through."""
    started = time.monotonic()
    looked_up = cache.cacheable(request)
    try:
        async with aclosing(_serve(request, whole=whole)) as items:
            async for item in items:
                if isinstance(item, ChatResult):
                    metrics.record_total(ok=True, latency_ms=item.latency_ms, ttft_ms=item.ttft_ms,
                                         prompt_tokens=item.usage.prompt_tokens,
                                         completion_tokens=item.usage.completion_tokens,
                                         cache_hit=item.cache_hit if looked_up else None)
                yield item
    except LLMError as exc:
        partial = exc.partial
        metrics.record_total(ok=False, latency_ms=_ms(started), ttft_ms=partial.ttft_ms if partial else None,
                             prompt_tokens=partial.usage.prompt_tokens if partial else 0,
                             completion_tokens=partial.usage.completion_tokens if partial else 0,
                             cache_hit=False if looked_up else None)
        raise


async def _serve(request: ChatRequest, *, whole: bool) -> AsyncGenerator[TextDelta | ChatResult, None]:
    call = _Call(request, whole)
    key = cache.cache_key(request) if cache.cacheable(request) else None
    if key is not None:
        hit = await cache.response_cache.get(key)
        if hit is not None:
            result = _from_cache(hit, call)
            metrics.record_call(model=request.model, ok=True, latency_ms=result.latency_ms, ttft_ms=result.ttft_ms,
                                cache_hit=True)
            if not whole:
                served = Served(provider=result.provider, deployment_id=result.deployment_id, model=result.model,
                                cache_hit=True)
                for n, piece in enumerate(_pieces(result.content)):
                    yield TextDelta(piece, served=None if n else served)
            yield result
            return

    try:
        async with aclosing(_run_model(call, request, request.model, timeout=request.timeout)) as items:
            async for item in items:
                if isinstance(item, ChatResult):
                    _record_call(call, item, ok=True, looked_up=key is not None)
                    if key is not None and item.finish_reason in ("stop", "length"):
                        await cache.response_cache.set(key, _to_cache(item))
                yield item
        return
    except LLMError as exc:
        _record_failure(call, request.model, exc, looked_up=key is not None)
        fallback = request.fallback_model
        if not fallback or fallback == request.model or call.delivered or not _falls_back(exc):
            raise
        reason = "timeout" if isinstance(exc, UpstreamTimeout) else exc.code

    # The fallback gets a budget of its own (the same timeout), so a call never waits longer than twice it.
    fallback_request = replace(request, model=fallback, fallback_model=None)
    try:
        async with aclosing(_run_model(call, fallback_request, fallback, timeout=request.timeout)) as items:
            async for item in items:
                if isinstance(item, ChatResult):
                    item.fallback, item.fallback_reason = True, reason
                    _record_call(call, item, ok=True, looked_up=False)
                yield item
    except LLMError as exc:
        _record_failure(call, fallback, exc, looked_up=False)
        if exc.partial is not None:
            exc.partial.fallback, exc.partial.fallback_reason = True, reason
        raise


def _falls_back(exc: LLMError) -> bool:
    """Timeouts, errors that kept coming after retries, refused credentials, no usable deployment: yes.
    The request's own fault (a 4xx such as 400): no, the fallback would refuse it too."""
    return not isinstance(exc, BadUpstreamRequest)


async def _run_model(call: _Call, request: ChatRequest, model_name: str, *,
                     timeout: float | None) -> AsyncGenerator[TextDelta | ChatResult, None]:
    """One public model: attempts across its deployments until one succeeds or the budget is spent."""
    route = await registry.get_route(model_name)
    if not route.deployments:
        raise NoHealthyDeployment(f"Model '{model_name}' has no enabled deployment.")
    deadline = time.monotonic() + timeout if timeout else None
    max_attempts = min(MAX_ATTEMPTS, max(1 + max(d.max_retries for d in route.deployments), len(route.deployments)))
    tried: Counter[int] = Counter()
    last_error: LLMError | None = None
    for _ in range(max_attempts):
        if deadline is not None and time.monotonic() >= deadline:
            raise _deadline_error(request)
        deployment = _choose(route, tried)
        if tried[deployment.id]:  # same deployment again: back off first
            hint = last_error.retry_after if last_error else None
            delay = retry.backoff_delay(tried[deployment.id], retry_after=hint)
            if deadline is not None:
                delay = min(delay, max(0.0, deadline - time.monotonic()))
            await asyncio.sleep(delay)
        deployment, lease = await _acquire(route, deployment, tried, call, deadline)
        tried[deployment.id] += 1
        try:
            async with aclosing(_attempt(call, request, route, deployment, lease, deadline)) as items:
                async for item in items:
                    yield item
            return
        except LLMError as exc:
            if call.delivered:
                raise
            if not retry.is_retryable(exc):
                # A deployment-specific refusal (bad key) may go to another deployment, never to the same one.
                if not (exc.failover and any(not tried[d.id] for d in route.deployments)):
                    raise
            if isinstance(exc, UpstreamTimeout) and exc.deadline:
                raise  # the caller's time budget is spent: move on (fallback), don't retry
            last_error = exc
    assert last_error is not None
    raise last_error


def _candidates(route: ModelRoute, tried: Counter[int]) -> list[DeploymentInfo]:
    """Usable deployments in preference order: breaker allows, not unhealthy, not yet tried by this call."""
    usable = [d for d in route.deployments
              if breaker.get(d.id, threshold=d.breaker_threshold, recovery=d.breaker_recovery).available()]
    if not usable:
        raise NoHealthyDeployment(f"Every deployment of '{route.name}' is failing (circuit open); try later.")
    healthy = [d for d in usable if health.status(d.id, d.probe_status) != health.UNHEALTHY] or usable
    return [d for d in healthy if not tried[d.id]] or healthy


def _choose(route: ModelRoute, tried: Counter[int], refused: Set[int] = frozenset()) -> DeploymentInfo:
    candidates = [d for d in _candidates(route, tried) if d.id not in refused]
    if not candidates:
        raise RateLimited(f"All deployments of '{route.name}' are at their rate limits.")
    return balancer.choose(route.name, route.strategy, candidates)


async def _acquire(route: ModelRoute, first: DeploymentInfo, tried: Counter[int], call: _Call,
                   deadline: float | None) -> tuple[DeploymentInfo, ratelimit.Lease]:
    """A rate-limit lease on `first`, else on another deployment, else after a short wait, else RateLimited."""
    waited = 0.0
    deployment: DeploymentInfo | None = first
    refused: set[int] = set()
    shortest = None
    while True:
        if deployment is None:
            deployment = _choose(route, tried, refused) if len(refused) < len(route.deployments) else None
        if deployment is not None:
            limits = ratelimit.limits_for(deployment.rpm, deployment.tpm, deployment.max_concurrency,
                                          deployment.timeout)
            est = call.prompt_tokens(deployment.upstream_model) if limits.tpm else 0
            outcome = await ratelimit.acquire(deployment.id, limits, tokens=est)
            if isinstance(outcome, ratelimit.Lease):
                if breaker.get(deployment.id, threshold=deployment.breaker_threshold,
                               recovery=deployment.breaker_recovery).allow():
                    return deployment, outcome
                await ratelimit.settle(outcome, limits)  # lost the half-open trial slot to another call
                refused.add(deployment.id)
            else:
                refused.add(deployment.id)
                shortest = outcome.retry_after if shortest is None else min(shortest, outcome.retry_after)
            try:
                deployment = _choose(route, tried, refused)
                continue
            except RateLimited:
                deployment = None
        budget = settings.LLM_RATE_LIMIT_MAX_WAIT - waited
        if deadline is not None:
            budget = min(budget, deadline - time.monotonic())
        pause = min(shortest or 0.05, 0.25)
        if budget < pause:
            raise RateLimited(f"Rate limit reached for '{route.name}' ({_reason(refused, route)}).",
                              retry_after=shortest)
        await asyncio.sleep(pause)
        waited += pause
        refused.clear()
        shortest = None


def _reason(refused: set[int], route: ModelRoute) -> str:
    return f"{len(refused)} of {len(route.deployments)} deployments at their limits"


async def _attempt(call: _Call, request: ChatRequest, route: ModelRoute, deployment: DeploymentInfo,
                   lease: ratelimit.Lease, deadline: float | None) -> AsyncGenerator[TextDelta | ChatResult, None]:
    unsettled: ratelimit.Lease | None = lease  # settled once: with the real tokens on success, else in `finally`
    adapter = clients.adapter_for(deployment)
    circuit = breaker.get(deployment.id, threshold=deployment.breaker_threshold, recovery=deployment.breaker_recovery)
    limits = ratelimit.limits_for(deployment.rpm, deployment.tpm, deployment.max_concurrency, deployment.timeout)
    started = time.monotonic()
    ttft_ms: int | None = None
    parts: list[str] = []
    calls: list[dict[str, Any]] = []
    usage: Usage | None = None
    finish_reason: str | None = None
    verdict = False
    balancer.acquire(deployment.id)
    upstream = adapter.stream(request, deployment.upstream_model)
    try:
        try:
            while True:
                wait = None
                if deadline is not None and (call.whole or ttft_ms is None):
                    wait = deadline - time.monotonic()
                    if wait <= 0:
                        raise _deadline_error(request)
                try:
                    if wait is None:  # no deadline, or past the first token of a stream: no timer per chunk
                        item = await upstream.__anext__()
                    else:
                        # asyncio.timeout, not wait_for: the generator keeps running in this task (no task hop).
                        async with asyncio.timeout(wait):
                            item = await upstream.__anext__()
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    raise _deadline_error(request) from None
                if isinstance(item, Usage):
                    usage = item
                    continue
                if item.finish_reason:
                    finish_reason = item.finish_reason
                if item.tool_calls:
                    merge_tool_calls(calls, item.tool_calls)
                if not item.content and not item.tool_calls:
                    continue
                if ttft_ms is None:
                    ttft_ms = _ms(started)
                    if call.ttft_ms is None:
                        call.ttft_ms = _ms(call.started)
                if item.content:
                    parts.append(item.content)
                if not call.whole:
                    if not call.delivered:
                        item.served = Served(provider=deployment.provider, deployment_id=deployment.id,
                                             model=route.name, fallback=route.name != call.request.model)
                    call.delivered = True
                    yield item
        except LLMError as exc:
            latency = _ms(started)
            # A 4xx is the request's fault, not the deployment's; refused credentials are the deployment's.
            counts = exc.retryable or exc.failover
            if counts:
                circuit.failure()
                verdict = True
            health.record(deployment.id, not counts, latency, exc.code)
            metrics.record_attempt(deployment_id=deployment.id, model=route.name, provider=deployment.provider,
                                   upstream_model=deployment.upstream_model, ok=False, latency_ms=latency,
                                   ttft_ms=ttft_ms)
            call.attempts.append(Attempt(provider=deployment.provider, deployment_id=deployment.id,
                                         upstream_model=deployment.upstream_model, model=route.name, ok=False,
                                         error_code=exc.code, latency_ms=latency))
            if parts and exc.partial is None:
                exc.partial = _partial(call, route, deployment, "".join(parts), ttft_ms)
            raise
        content = "".join(parts)
        if usage is None:
            generated = content + "".join(c.get("function", {}).get("arguments", "") for c in calls)
            usage = Usage(prompt_tokens=call.prompt_tokens(deployment.upstream_model),
                          completion_tokens=tokens.count_text(generated, deployment.upstream_model),
                          source="estimated")
        latency = _ms(started)
        circuit.success()
        verdict = True
        health.record(deployment.id, True, latency)
        metrics.record_attempt(deployment_id=deployment.id, model=route.name, provider=deployment.provider,
                               upstream_model=deployment.upstream_model, ok=True, latency_ms=latency, ttft_ms=ttft_ms,
                               prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens)
        call.attempts.append(Attempt(provider=deployment.provider, deployment_id=deployment.id,
                                     upstream_model=deployment.upstream_model, model=route.name, ok=True,
                                     latency_ms=latency))
        result = ChatResult(
            content=content, usage=usage, model=route.name, provider=deployment.provider,
            deployment_id=deployment.id, upstream_model=deployment.upstream_model,
            # The upstream's own reason when it gave one; else "length" when the reply used up max_tokens.
            finish_reason=finish_reason or ("stop" if not request.max_tokens
                                            or usage.completion_tokens < request.max_tokens else "length"),
            latency_ms=_ms(call.started), ttft_ms=call.ttft_ms,
            attempts=list(call.attempts), tool_calls=calls or None,
        )
        await ratelimit.settle(lease, limits, actual_tokens=usage.total_tokens)
        unsettled = None
        yield result
    finally:
        balancer.release(deployment.id)
        if not verdict:
            circuit.release_trial()
        await upstream.aclose()
        if unsettled is not None:
            await ratelimit.settle(unsettled, limits, actual_tokens=call._prompt_tokens)


def merge_tool_calls(calls: list[dict[str, Any]], pieces: list[dict[str, Any]]) -> None:
    """Streamed function-call pieces into whole calls (OpenAI's shape): the first piece of a call (by `index`)
    brings its id, type and name; the rest add slices of its arguments."""
    for piece in pieces:
        index = piece.get("index", len(calls))
        while len(calls) <= index:
            calls.append({"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
        whole = calls[index]
        whole["id"] = piece.get("id") or whole["id"]
        whole["type"] = piece.get("type") or whole["type"]
        function = piece.get("function") or {}
        whole["function"]["name"] += function.get("name") or ""
        whole["function"]["arguments"] += function.get("arguments") or ""


def _deadline_error(request: ChatRequest) -> UpstreamTimeout:
    # The caller's budget, not one deployment's: no retry on this model.
    return UpstreamTimeout(f"No reply within the {request.timeout:g}s timeout.", deadline=True)


def _partial(call: _Call, route: ModelRoute, deployment: DeploymentInfo, content: str,
             ttft_ms: int | None) -> ChatResult:
    """What arrived before a stream died, with usage estimated offline (source="partial")."""
    usage = Usage(prompt_tokens=call.prompt_tokens(deployment.upstream_model),
                  completion_tokens=tokens.count_text(content, deployment.upstream_model), source="partial")
    return ChatResult(content=content, usage=usage, model=route.name, provider=deployment.provider,
                      deployment_id=deployment.id, upstream_model=deployment.upstream_model, finish_reason=None,
                      latency_ms=_ms(call.started), ttft_ms=call.ttft_ms, attempts=call.attempts)


# --- metrics and cache helpers ----------------------------------------------------------------

def _record_call(call: _Call, result: ChatResult, *, ok: bool, looked_up: bool) -> None:
    metrics.record_call(model=result.model, ok=ok, latency_ms=result.latency_ms, ttft_ms=result.ttft_ms,
                        prompt_tokens=result.usage.prompt_tokens, completion_tokens=result.usage.completion_tokens,
                        cache_hit=False if looked_up else None)


def _record_failure(call: _Call, model: str, exc: LLMError, *, looked_up: bool) -> None:
    usage = exc.partial.usage if exc.partial is not None else Usage()
    metrics.record_call(model=model, ok=False, latency_ms=_ms(call.started), ttft_ms=call.ttft_ms,
                        prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                        cache_hit=False if looked_up else None)


def _to_cache(result: ChatResult) -> dict[str, Any]:
    return {"content": result.content, "finish_reason": result.finish_reason, "provider": result.provider,
            "deployment_id": result.deployment_id, "upstream_model": result.upstream_model,
            "prompt_tokens": result.usage.prompt_tokens, "completion_tokens": result.usage.completion_tokens}


def _from_cache(hit: dict[str, Any], call: _Call) -> ChatResult:
    """A cache hit used no upstream tokens: usage is zero, so it costs nothing."""
    latency = _ms(call.started)
    return ChatResult(content=hit["content"], usage=Usage(), model=call.request.model, provider=hit["provider"],
                      deployment_id=hit["deployment_id"], upstream_model=hit["upstream_model"],
                      finish_reason=hit["finish_reason"], latency_ms=latency,
                      ttft_ms=None if call.whole else latency, cache_hit=True)


_PIECE = re.compile(r"\S+\s*|\s+")


def _pieces(text: str, words: int = 4) -> list[str]:
    """A cached reply streamed back a few words at a time."""
    found = _PIECE.findall(text)
    return ["".join(found[i:i + words]) for i in range(0, len(found), words)] or ([text] if text else [])


def reset_state() -> None:
    """Forget in-process state: route cache, balancer, breakers, health, limits, cache, metrics (tests)."""
    registry.clear()
    balancer.reset()
    breaker.reset()
    health.reset()
    ratelimit.reset()
    cache.reset()
    metrics.reset()
    clients.reset()
    redis_guard.reset()
