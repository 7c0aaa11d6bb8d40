"""The real openai SDK against the ASGI app in this process (httpx's ASGI transport), so the SDK's view
of our bodies and errors is checked in the bare SQLite run too. Streams arrive whole here; streaming
over the wire is covered against live daphne in test_openai_sdk.py."""

from __future__ import annotations

import httpx2
import openai
import pytest
from asgiref.sync import sync_to_async
from django.core.asgi import get_asgi_application

from devtools.fake_openai import echo_text
from tests.factories import make_agent, make_fake_model, make_provider
from tests.fixtures_openai import make_account, start_of_a_fresh_minute

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("close_thread_connections")]

MESSAGES = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hello there"}]


@pytest.fixture
async def sdk():
    """sdk(raw_key) -> an AsyncOpenAI client talking to the ASGI app; closed at the end of the test."""
    clients = []

    def make(raw_key: str) -> openai.AsyncOpenAI:
        transport = httpx2.ASGITransport(app=get_asgi_application())
        clients.append(openai.AsyncOpenAI(base_url="http://testserver/v1", api_key=raw_key, max_retries=0,
                                          http_client=httpx2.AsyncClient(transport=transport)))
        return clients[-1]

    yield make
    for client in clients:
        await client.close()


async def test_completion_and_stream_parse_in_the_sdk(openai_account, fake_gpt, fake_upstream, sdk):
    client = sdk(openai_account.raw)
    reply = await client.chat.completions.create(model="fake-gpt", messages=MESSAGES)
    assert reply.choices[0].message.content == echo_text(MESSAGES) and reply.usage.total_tokens > 0
    stream = await client.chat.completions.create(model="fake-gpt", messages=MESSAGES, stream=True,
                                                  stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == echo_text(MESSAGES)
    assert chunks[-1].usage.total_tokens == reply.usage.total_tokens


async def test_models_list_and_retrieve(openai_account, fake_gpt, fake_upstream, sdk):
    await sync_to_async(make_agent)("helper", model=fake_gpt)
    client = sdk(openai_account.raw)
    assert [m.id async for m in client.models.list()] == ["fake-gpt", "agent:helper"]
    assert (await client.models.retrieve("agent:helper")).id == "agent:helper"


async def test_error_classes(openai_account, fake_gpt, fake_upstream, sdk):
    with pytest.raises(openai.AuthenticationError):
        await sdk("aiw_bad").chat.completions.create(model="fake-gpt", messages=MESSAGES)
    with pytest.raises(openai.NotFoundError):
        await sdk(openai_account.raw).chat.completions.create(model="nope", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError) as info:
        await sdk(openai_account.raw).chat.completions.create(model="fake-gpt", messages=MESSAGES, n=3)
    assert info.value.param == "n"


async def test_exhausted_balance_is_api_status_error_402(fake_gpt, fake_upstream, sdk):
    broke = await sync_to_async(make_account)(credit=None)
    with pytest.raises(openai.APIStatusError) as info:
        await sdk(broke.raw).chat.completions.create(model="fake-gpt", messages=MESSAGES)
    assert info.value.status_code == 402 and info.value.code == "insufficient_balance"
    assert fake_upstream.requests == []


async def test_key_rate_limit_is_rate_limit_error(fake_gpt, fake_upstream, sdk):
    account = await sync_to_async(make_account)(rpm=1)
    client = sdk(account.raw)
    await sync_to_async(start_of_a_fresh_minute)()
    await client.chat.completions.create(model="fake-gpt", messages=MESSAGES)
    with pytest.raises(openai.RateLimitError) as info:
        await client.chat.completions.create(model="fake-gpt", messages=MESSAGES)
    assert info.value.type == "requests" and int(info.value.response.headers["retry-after"]) >= 1


async def test_mid_stream_failure_raises_api_error(openai_account, fake_upstream, sdk):
    provider = await sync_to_async(make_provider)(kind="openai", base_url=fake_upstream.base_url, max_retries=0)
    await sync_to_async(make_fake_model)(fake_upstream, "cut-gpt", provider=provider)
    fake_upstream.configure("cut-gpt", tokens=30, cut_after=4)
    stream = await sdk(openai_account.raw).chat.completions.create(model="cut-gpt", messages=MESSAGES, stream=True)
    received = []
    with pytest.raises(openai.APIError) as info:
        async for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")
    assert "".join(received) == "Echo. System:"  # the role chunk, then 4 pieces
    assert info.value.type == "upstream_error"
