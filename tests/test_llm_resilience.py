"""Failover, retries, circuit breaker and timeout → fallback, against the real fake upstream."""

import asyncio
import time

import pytest
from asgiref.sync import sync_to_async

from agents.llm import breaker, service
from agents.llm.types import BadUpstreamRequest, ChatRequest, ChatResult, LLMError, TextDelta, UpstreamTimeout
from agents.models import LLMModel
from tests.factories import add_fake_deployment, make_fake_model

pytestmark = pytest.mark.django_db(transaction=True)

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a fact"}]


@pytest.fixture(autouse=True)
def _fast_backoff(settings):
    settings.LLM_RETRY_BASE_DELAY = 0.01
    settings.LLM_RETRY_MAX_DELAY = 0.05


@sync_to_async
def _two_deployments(fake_upstream, name="pair", **provider_fields) -> LLMModel:
    model = LLMModel.objects.create(name=name, strategy="round_robin")
    add_fake_deployment(fake_upstream, model, "a", **provider_fields)
    add_fake_deployment(fake_upstream, model, "b", **provider_fields)
    return model


def _req(model: str, **kw) -> ChatRequest:
    return ChatRequest(model=model, messages=MESSAGES, **kw)


async def test_failover_when_a_deployment_returns_500(fake_upstream):
    model = await _two_deployments(fake_upstream)
    fake_upstream.configure("a", status=500)
    for _ in range(4):
        result = await service.complete(_req(model.name))
        assert result.upstream_model == "b" and "User: Tell me a fact" in result.content
    first = (await service.complete(_req(model.name))).attempts
    assert [a.ok for a in first] in ([True], [False, True])


async def test_failover_when_a_deployment_hangs(fake_upstream):
    model = await _two_deployments(fake_upstream, timeout=0.3)
    fake_upstream.configure("a", hang=True)
    started = time.monotonic()
    result = await service.complete(_req(model.name))
    assert result.upstream_model == "b"
    assert [(a.upstream_model, a.ok, a.error_code) for a in result.attempts] == [
        ("a", False, "upstream_timeout"), ("b", True, "")]
    assert time.monotonic() - started < 2


async def test_streamed_failover_before_first_delta(fake_upstream):
    model = await _two_deployments(fake_upstream)
    fake_upstream.configure("a", status=503)
    items = [i async for i in service.stream(_req(model.name))]
    assert isinstance(items[-1], ChatResult) and items[-1].upstream_model == "b"
    assert "".join(i.content for i in items if isinstance(i, TextDelta)) == items[-1].content


async def test_no_retry_on_400(fake_upstream):
    model = await _two_deployments(fake_upstream, max_retries=3)
    fake_upstream.configure("a", status=400)
    fake_upstream.configure("b", status=400)
    with pytest.raises(BadUpstreamRequest) as info:
        await service.complete(_req(model.name, fallback_model=None))
    assert len(fake_upstream.requests) == 1 and info.value.retryable is False
    ids = await sync_to_async(lambda: list(model.deployments.values_list("pk", flat=True)))()
    assert all(breaker.get(i).failures == 0 for i in ids)  # the request's fault, not the deployment's


async def test_retries_the_same_deployment_with_backoff_on_429(fake_upstream):
    model = await sync_to_async(make_fake_model)(fake_upstream, "solo", upstream_model="s")
    fake_upstream.configure("s", status=429, retry_after=0.05, fail_times=2)
    started = time.monotonic()
    result = await service.complete(_req(model.name))
    assert [a.ok for a in result.attempts] == [False, False, True]
    assert time.monotonic() - started >= 0.1  # Retry-After honoured twice
    assert len(fake_upstream.requests) == 3


async def test_gives_up_after_max_retries(fake_upstream):
    model = await sync_to_async(make_fake_model)(fake_upstream, "solo", upstream_model="s")
    fake_upstream.configure("s", status=500)
    with pytest.raises(LLMError) as info:
        await service.complete(_req(model.name))
    assert info.value.code == "upstream_error" and len(fake_upstream.requests) == 3  # 1 + max_retries=2


async def test_breaker_opens_half_opens_and_closes(fake_upstream):
    model = await sync_to_async(make_fake_model)(fake_upstream, "brk", upstream_model="x")
    await sync_to_async(lambda: model.deployments.first().provider.__class__.objects.update(
        breaker_failure_threshold=3, breaker_recovery_seconds=0.3, max_retries=0))()
    fake_upstream.configure("x", status=500)
    for _ in range(3):
        with pytest.raises(LLMError):
            await service.complete(_req(model.name))
    dep_id = (await sync_to_async(lambda: model.deployments.first().pk)())
    assert breaker.state_of(dep_id) == "open"
    with pytest.raises(LLMError) as info:  # open: fails fast without calling the upstream
        await service.complete(_req(model.name))
    assert info.value.code == "no_healthy_deployment" and len(fake_upstream.requests) == 3

    await asyncio.sleep(0.35)
    assert breaker.state_of(dep_id) == "half_open"
    with pytest.raises(LLMError):  # the trial fails: open again
        await service.complete(_req(model.name))
    assert breaker.state_of(dep_id) == "open" and len(fake_upstream.requests) == 4

    await asyncio.sleep(0.35)
    fake_upstream.configure("x", status=200)
    result = await service.complete(_req(model.name))  # the trial succeeds: closed
    assert result.content and breaker.state_of(dep_id) == "closed"


@sync_to_async
def _primary_and_fallback(fake_upstream):
    primary = make_fake_model(fake_upstream, "primary", upstream_model="slow")
    fallback = make_fake_model(fake_upstream, "backup", upstream_model="quick")
    return primary, fallback


async def test_stream_timeout_to_first_token_moves_to_fallback(fake_upstream):
    primary, fallback = await _primary_and_fallback(fake_upstream)
    fake_upstream.configure("slow", latency=2.0)
    started = time.monotonic()
    items = [i async for i in service.stream(_req(primary.name, timeout=0.3, fallback_model=fallback.name))]
    result = items[-1]
    assert result.fallback is True and result.fallback_reason == "timeout"
    assert result.model == "backup" and result.upstream_model == "quick"
    assert "User: Tell me a fact" in result.content
    assert time.monotonic() - started < 1.5


async def test_stream_timeout_counts_to_first_token_only(fake_upstream):
    primary, fallback = await _primary_and_fallback(fake_upstream)
    fake_upstream.configure("slow", tokens=8, chunk_delay=0.1)  # first token fast, whole reply ~0.7 s
    result = [i async for i in service.stream(_req(primary.name, timeout=0.3, fallback_model=fallback.name))][-1]
    assert result.fallback is False and result.usage.completion_tokens == 8


async def test_complete_timeout_is_total_and_moves_to_fallback(fake_upstream):
    primary, fallback = await _primary_and_fallback(fake_upstream)
    fake_upstream.configure("slow", tokens=8, chunk_delay=0.1)
    result = await service.complete(_req(primary.name, timeout=0.3, fallback_model=fallback.name))
    assert result.fallback is True and result.fallback_reason == "timeout" and result.model == "backup"


async def test_timeout_without_fallback_raises_timeout(fake_upstream):
    primary, _ = await _primary_and_fallback(fake_upstream)
    fake_upstream.configure("slow", latency=2.0)
    with pytest.raises(UpstreamTimeout):
        await service.complete(_req(primary.name, timeout=0.2))


async def test_failing_primary_moves_to_fallback_with_reason(fake_upstream):
    primary, fallback = await _primary_and_fallback(fake_upstream)
    fake_upstream.configure("slow", status=502)
    result = await service.complete(_req(primary.name, fallback_model=fallback.name))
    assert result.fallback is True and result.fallback_reason == "upstream_error"
    assert [a.model for a in result.attempts] == ["primary"] * 3 + ["backup"]


async def test_refused_credentials_fail_over_but_are_not_retried(fake_upstream):
    model = await _two_deployments(fake_upstream, max_retries=3)
    fake_upstream.configure("a", status=401)
    result = await service.complete(_req(model.name))
    assert result.upstream_model == "b" and len(fake_upstream.requests_for("a")) == 1
    fake_upstream.configure("b", status=401)
    with pytest.raises(LLMError) as info:
        await service.complete(_req(model.name))
    assert info.value.code == "upstream_auth" and info.value.retryable is False
    assert len(fake_upstream.requests) <= 4  # each deployment at most once per call


async def test_half_open_lets_one_trial_call_through_at_a_time(fake_upstream):
    model = await sync_to_async(make_fake_model)(fake_upstream, "trial", upstream_model="t")
    await sync_to_async(lambda: model.deployments.first().provider.__class__.objects.update(
        breaker_failure_threshold=1, breaker_recovery_seconds=0.2, max_retries=0))()
    fake_upstream.configure("t", status=500)
    with pytest.raises(LLMError):
        await service.complete(_req(model.name))
    await asyncio.sleep(0.25)
    fake_upstream.configure("t", status=200, latency=0.3)
    outcomes = await asyncio.gather(service.complete(_req(model.name)), service.complete(_req(model.name)),
                                    return_exceptions=True)
    assert sorted(type(o).__name__ for o in outcomes) == ["ChatResult", "NoHealthyDeployment"]
    assert len(fake_upstream.requests) == 2  # the failure, then the single trial
