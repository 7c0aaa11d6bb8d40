"""Usage is never lost: measured from the upstream, estimated offline when it reports none, partial on a cut."""

import pytest
from asgiref.sync import sync_to_async

from agents.llm import service, tokens
from agents.llm.types import ChatRequest, ChatResult, LLMError, TextDelta
from tests.factories import make_fake_model

pytestmark = pytest.mark.django_db(transaction=True)

MESSAGES = [{"role": "system", "content": "You are a poet."}, {"role": "user", "content": "Write about rivers"}]


@pytest.fixture
async def model(fake_upstream):
    return await sync_to_async(make_fake_model)(fake_upstream, "usage-m", upstream_model="u")


async def test_measured_usage_from_upstream_with_cached_tokens(fake_upstream, model):
    fake_upstream.configure("u", tokens=30, cached_tokens=7)
    result = await service.complete(ChatRequest(model=model.name, messages=MESSAGES))
    assert result.usage.source == "measured" and result.usage.completion_tokens == 30
    assert result.usage.cached_prompt_tokens == 7 and result.usage.prompt_tokens > 10


async def test_estimated_usage_is_close_to_upstream_figure(fake_upstream, model):
    fake_upstream.configure("u", tokens=25)
    measured = await service.complete(ChatRequest(model=model.name, messages=MESSAGES))
    fake_upstream.configure("u", tokens=25, omit_usage=True)
    estimated = await service.complete(ChatRequest(model=model.name, messages=MESSAGES))
    assert estimated.usage.source == "estimated" and estimated.content == measured.content
    assert abs(estimated.usage.prompt_tokens - measured.usage.prompt_tokens) <= 3
    assert abs(estimated.usage.completion_tokens - measured.usage.completion_tokens) <= 3


async def test_stream_cut_midway_raises_with_partial_usage(fake_upstream, model):
    fake_upstream.configure("u", tokens=40, cut_after=10)
    received = []
    with pytest.raises(LLMError) as info:
        async for item in service.stream(ChatRequest(model=model.name, messages=MESSAGES)):
            received.append(item)
    partial = info.value.partial
    assert info.value.code == "upstream_unavailable"
    assert all(isinstance(i, TextDelta) for i in received) and len(received) == 10
    assert isinstance(partial, ChatResult) and partial.content == "".join(i.content for i in received)
    assert partial.usage.source == "partial" and partial.usage.completion_tokens == 10
    assert partial.usage.prompt_tokens == tokens.count_messages(MESSAGES, "u")
    assert len(fake_upstream.requests) == 1  # never retried once text reached the caller


async def test_malformed_stream_after_first_delta_keeps_partial(fake_upstream, model):
    fake_upstream.configure("u", tokens=20, malformed=True)
    with pytest.raises(LLMError) as info:
        async for _ in service.stream(ChatRequest(model=model.name, messages=MESSAGES)):
            pass
    assert info.value.code == "upstream_bad_response"
    assert info.value.partial is not None and info.value.partial.usage.source == "partial"


async def test_whole_reply_cut_midway_is_retried(fake_upstream, model, settings):
    settings.LLM_RETRY_BASE_DELAY = 0.01
    fake_upstream.configure("u", tokens=40, cut_after=10, fail_times=1)
    result = await service.complete(ChatRequest(model=model.name, messages=MESSAGES))
    assert result.usage.completion_tokens == 40 and [a.ok for a in result.attempts] == [False, True]


async def test_stream_closed_by_caller_releases_the_deployment(fake_upstream, model):
    from agents.llm import balancer

    fake_upstream.configure("u", tokens=50, chunk_delay=0.01)
    stream = service.stream(ChatRequest(model=model.name, messages=MESSAGES))
    async for _ in stream:
        break
    await stream.aclose()
    dep_id = await sync_to_async(lambda: model.deployments.first().pk)()
    assert balancer.active(dep_id) == 0
