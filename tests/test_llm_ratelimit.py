"""Per-deployment RPM / TPM / concurrency limits: in process without Redis, across processes with it."""

import asyncio
import os
import subprocess
import sys
import textwrap

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings as django_settings

from agents.llm import ratelimit, service
from agents.llm.types import ChatRequest, RateLimited
from agents.models import LLMModel
from tests.factories import add_fake_deployment, make_fake_model, make_provider

pytestmark = pytest.mark.django_db(transaction=True)

MESSAGES = [{"role": "user", "content": "hello"}]


@pytest.fixture(autouse=True)
def _no_waiting(settings):
    settings.LLM_RATE_LIMIT_MAX_WAIT = 0


@sync_to_async
def _limited_model(fake_upstream, **limits) -> LLMModel:
    provider = make_provider(kind="openai", base_url=fake_upstream.base_url, api_key="k", **limits)
    return make_fake_model(fake_upstream, "limited", upstream_model="l", provider=provider)


async def test_rpm_refuses_the_call_over_the_limit(fake_upstream):
    model = await _limited_model(fake_upstream, rpm=3)
    for _ in range(3):
        await service.complete(ChatRequest(model=model.name, messages=MESSAGES))
    with pytest.raises(RateLimited) as info:
        await service.complete(ChatRequest(model=model.name, messages=MESSAGES))
    assert info.value.code == "rate_limited" and info.value.retry_after > 0
    assert fake_upstream.served["l"] == 3


async def test_a_limited_deployment_hands_over_to_another(fake_upstream):
    model = await _limited_model(fake_upstream, rpm=2)
    await sync_to_async(add_fake_deployment)(fake_upstream, model, "free")
    results = [await service.complete(ChatRequest(model=model.name, messages=MESSAGES)) for _ in range(6)]
    assert fake_upstream.served["l"] == 2 and fake_upstream.served["free"] == 4
    assert all(r.content for r in results)


async def test_tpm_counts_actual_tokens(fake_upstream):
    model = await _limited_model(fake_upstream, tpm=100)
    fake_upstream.configure("l", tokens=120)
    await service.complete(ChatRequest(model=model.name, messages=MESSAGES))  # first one always fits
    with pytest.raises(RateLimited):
        await service.complete(ChatRequest(model=model.name, messages=MESSAGES))


async def test_concurrency_limit_waits_briefly_then_proceeds(fake_upstream, settings):
    settings.LLM_RATE_LIMIT_MAX_WAIT = 2.0
    model = await _limited_model(fake_upstream, max_concurrency=1)
    fake_upstream.configure("l", tokens=3, latency=0.3)
    first, second = await asyncio.gather(*(service.complete(ChatRequest(model=model.name, messages=MESSAGES))
                                           for _ in range(2)))
    assert first.content and second.content
    starts = sorted(r["time"] for r in fake_upstream.requests)
    assert starts[1] - starts[0] >= 0.25  # the second waited for the first's slot


async def test_concurrency_limit_refuses_when_no_wait_allowed(fake_upstream):
    model = await _limited_model(fake_upstream, max_concurrency=1)
    fake_upstream.configure("l", tokens=3, latency=0.3)
    outcomes = await asyncio.gather(*(service.complete(ChatRequest(model=model.name, messages=MESSAGES))
                                      for _ in range(2)), return_exceptions=True)
    assert sorted(type(o).__name__ for o in outcomes) == ["ChatResult", "RateLimited"]


_CHILD = textwrap.dedent("""
    import asyncio, django, sys
    django.setup()
    from agents.llm import ratelimit

    async def main():
        limits = ratelimit.Limits(rpm=10)
        got = 0
        for _ in range(8):
            if isinstance(await ratelimit.acquire(424242, limits), ratelimit.Lease):
                got += 1
        print(got)

    asyncio.run(main())
""")


@pytest.mark.redis
async def test_rpm_holds_across_two_processes_sharing_redis():
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "REDIS_URL": django_settings.REDIS_URL,
           "REDIS_KEY_PREFIX": django_settings.REDIS_KEY_PREFIX}
    child = await asyncio.create_subprocess_exec(sys.executable, "-c", _CHILD, env=env, cwd=django_settings.BASE_DIR,
                                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    limits = ratelimit.Limits(rpm=10)
    mine = 0
    for _ in range(8):
        if isinstance(await ratelimit.acquire(424242, limits), ratelimit.Lease):
            mine += 1
        await asyncio.sleep(0.01)
    out, err = await asyncio.wait_for(child.communicate(), 30)
    assert child.returncode == 0, err.decode()[-2000:]
    theirs = int(out.decode().split()[-1])
    assert mine + theirs == 10 and mine > 0 and theirs > 0


@pytest.mark.redis
async def test_concurrency_slots_are_shared_through_redis():
    limits = ratelimit.Limits(concurrency=2)
    leases = [await ratelimit.acquire(7, limits) for _ in range(3)]
    assert [type(x).__name__ for x in leases] == ["Lease", "Lease", "Refusal"]
    assert all(lease.redis for lease in leases[:2])
    await ratelimit.settle(leases[0], limits)
    assert isinstance(await ratelimit.acquire(7, limits), ratelimit.Lease)


@pytest.fixture
def _redis_down(settings):
    from aiwriter import redis as shared_redis

    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens there
    yield
    shared_redis._async_clients.clear()  # don't leave a client for the dead URL to a later loop


@pytest.mark.usefixtures("_redis_down")
async def test_redis_outage_falls_back_to_local_limits_and_memory_cache(fake_upstream):
    model = await _limited_model(fake_upstream, rpm=2)
    request = ChatRequest(model=model.name, messages=MESSAGES, temperature=0)
    await service.complete(request)
    assert (await service.complete(request)).cache_hit  # memory tier still serves
    await service.complete(ChatRequest(model=model.name, messages=MESSAGES))
    with pytest.raises(RateLimited):  # the limit still holds, in process
        await service.complete(ChatRequest(model=model.name, messages=MESSAGES))
