"""Staff debug runs of an agent, each logged as an AdminDebugLog (the admin's debug page calls these too).

- route test: which deployment the model's strategy would pick now, and why (no model call, no cost);
- prompt preview: the exact messages that would be sent (no call);
- execution test: a real metered call (CallContext.debug): its cost is logged here and in a debug UsageRecord,
  never charged to anyone's balance nor counted in any quota.
"""

from __future__ import annotations

import time
from typing import Any

from asgiref.sync import async_to_sync

from agents.llm import balancer, breaker, health, registry, tokens
from agents.llm.agent_request import build_agent_request
from agents.llm.types import LLMError
from agents.models import Agent
from usage import pipeline
from usage.metering import MeteredResult
from usage.models import AdminDebugLog, UsageRecord

DEFAULT_MESSAGES = [{"role": "user", "content": "Hello! Please introduce yourself in one sentence."}]


def _deployments(model_name: str) -> dict[str, Any]:
    route = registry.load_route(model_name)  # fresh from the database, not the route cache
    rows, candidates = [], []
    for d in route.deployments:
        breaker_state = breaker.state_of(d.id)
        available = breaker.get(d.id, threshold=d.breaker_threshold, recovery=d.breaker_recovery).available()
        status = health.status(d.id, d.probe_status)
        rows.append({"id": d.id, "provider": d.provider, "upstream_model": d.upstream_model, "weight": d.weight,
                     "breaker": breaker_state, "health": status, "available": available})
        if available and status != health.UNHEALTHY:
            candidates.append(d)
    # The real picker, so the answer is what the next call would get (it advances the rotation by one pick).
    chosen = balancer.choose(route.name, route.strategy, candidates) if candidates else None
    return {"model": route.name, "strategy": route.strategy, "deployments": rows,
            "chosen": next((r for r in rows if chosen and r["id"] == chosen.id), None)}


def route_test(*, agent: Agent, staff_user: Any) -> AdminDebugLog:
    started = time.monotonic()
    try:
        result = _deployments(agent.model.name)
        if agent.fallback_model_id:
            result["fallback"] = _deployments(agent.fallback_model.name)
    except LLMError as exc:
        result = {"error": {"code": exc.code, "message": exc.message}}
    chosen = result.get("chosen") or {}
    return AdminDebugLog.objects.create(
        staff_user=staff_user, agent=agent, action=AdminDebugLog.Action.ROUTE, input={}, result=result,
        provider=chosen.get("provider", ""), model=agent.model.name,
        latency_ms=int((time.monotonic() - started) * 1000))


def prompt_preview(*, agent: Agent, staff_user: Any, messages: list[dict[str, Any]] | None) -> AdminDebugLog:
    messages = messages or DEFAULT_MESSAGES
    request = build_agent_request(agent, messages, user=staff_user)
    prompt_tokens = tokens.count_messages(request.messages, request.model)
    result = {"model": request.model, "messages": request.messages, "prompt_tokens": prompt_tokens,
              "max_tokens": request.max_tokens, "temperature": request.temperature,
              "fallback_model": request.fallback_model}
    return AdminDebugLog.objects.create(
        staff_user=staff_user, agent=agent, action=AdminDebugLog.Action.PREVIEW, input={"messages": messages},
        result=result, model=request.model, prompt_tokens=prompt_tokens)


def execution_test(*, agent: Agent, staff_user: Any, messages: list[dict[str, Any]] | None) -> AdminDebugLog:
    messages = messages or DEFAULT_MESSAGES
    target = pipeline.Target.for_agent(agent)  # here, sync: the agent's models are loaded before the loop runs
    request = pipeline.build_request(target, messages, account=staff_user)
    started = time.monotonic()
    record: UsageRecord | None

    async def run() -> MeteredResult:
        # The pipeline every entry point uses; no key (no key limits), metered as a debug run (never charged).
        call = await pipeline.prepare(target, messages, account=staff_user, api_key=None,
                                      entry_point=UsageRecord.EntryPoint.DEBUG, debug=True)
        return await pipeline.run_complete(call)

    try:
        metered = async_to_sync(run)()
    except LLMError as exc:
        record = exc.usage_record
        result = {"ok": False, "error": {"code": exc.code, "message": exc.message}}
    else:
        record = metered.record
        result = {"ok": True, "content": metered.result.content, "finish_reason": metered.result.finish_reason,
                  "fallback": metered.result.fallback, "cache_hit": metered.result.cache_hit,
                  "token_source": record.token_source}
    result["usage_record"] = record.pk if record is not None else None
    return AdminDebugLog.objects.create(
        staff_user=staff_user, agent=agent, action=AdminDebugLog.Action.RUN, input={"messages": messages},
        result=result, provider=record.provider if record else "", model=record.model if record else request.model,
        prompt_tokens=record.prompt_tokens if record else 0,
        completion_tokens=record.completion_tokens if record else 0, cost=record.cost if record else 0,
        latency_ms=int((time.monotonic() - started) * 1000))
