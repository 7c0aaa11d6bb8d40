"""The test upstream itself, driven through the real openai SDK."""

import httpx2
import openai
import pytest

pytestmark = pytest.mark.django_db(transaction=True)


def _client(fake_upstream) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=fake_upstream.base_url, api_key="k", max_retries=0, timeout=5)


MESSAGES = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hello there"}]


async def test_non_stream_echoes_prompt_and_reports_usage(fake_upstream):
    reply = await _client(fake_upstream).chat.completions.create(model="m1", messages=MESSAGES)
    assert reply.choices[0].message.content == "Echo. System: Be terse. | User: Hello there"
    assert reply.usage.prompt_tokens > 5 and reply.usage.completion_tokens > 5
    assert fake_upstream.served["m1"] == 1 and fake_upstream.requests[0]["body"]["messages"] == MESSAGES


async def test_stream_sends_tokens_then_usage_chunk(fake_upstream):
    fake_upstream.configure("m1", tokens=20, cached_tokens=4)
    stream = await _client(fake_upstream).chat.completions.create(
        model="m1", messages=MESSAGES, stream=True, stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("Echo. System: Be terse.")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 4


async def test_error_status_and_fail_times(fake_upstream):
    fake_upstream.configure("m1", status=429, retry_after=2, fail_times=1)
    with pytest.raises(openai.RateLimitError) as info:
        await _client(fake_upstream).chat.completions.create(model="m1", messages=MESSAGES)
    assert info.value.response.headers["retry-after"] == "2"
    reply = await _client(fake_upstream).chat.completions.create(model="m1", messages=MESSAGES)
    assert reply.choices[0].message.content


async def test_cut_stream_drops_connection(fake_upstream):
    fake_upstream.configure("m1", cut_after=3)
    stream = await _client(fake_upstream).chat.completions.create(model="m1", messages=MESSAGES, stream=True)
    got = []
    with pytest.raises((httpx2.HTTPError, openai.APIError)):
        async for c in stream:
            got.append(c)
    assert len(got) == 4 and fake_upstream.served["m1"] == 0  # role chunk + 3 pieces


async def test_hang_times_out(fake_upstream):
    fake_upstream.configure("m1", hang=True)
    client = openai.AsyncOpenAI(base_url=fake_upstream.base_url, api_key="k", max_retries=0, timeout=0.3)
    with pytest.raises(openai.APITimeoutError):
        await client.chat.completions.create(model="m1", messages=MESSAGES)


async def test_models_lists_configured(fake_upstream):
    fake_upstream.configure("m2", tokens=3)
    models = await _client(fake_upstream).models.list()
    assert [m.id for m in models.data] == ["m2"]


async def test_control_endpoints_for_standalone_use(fake_upstream):
    root = fake_upstream.base_url.removesuffix("/v1")
    async with httpx2.AsyncClient() as http:
        assert (await http.post(f"{root}/_control/configure", json={"model": "m3", "tokens": 2})).status_code == 200
        assert (await http.post(f"{root}/_control/configure", json={"model": "m3", "bogus": 1})).status_code == 400
        reply = await _client(fake_upstream).chat.completions.create(model="m3", messages=MESSAGES)
        assert reply.usage.completion_tokens == 2
        log = (await http.get(f"{root}/_control/requests")).json()
        assert log["served"] == {"m3": 1} and log["requests"][0]["model"] == "m3"
        await http.post(f"{root}/_control/reset")
    assert fake_upstream.requests == [] and fake_upstream.knobs == {}


async def test_per_request_override_through_extra_body(fake_upstream):
    reply = await _client(fake_upstream).chat.completions.create(
        model="m1", messages=MESSAGES, extra_body={"fake": {"reply": "fixed text"}})
    assert reply.choices[0].message.content == "fixed text"
