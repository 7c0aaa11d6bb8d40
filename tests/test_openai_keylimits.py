"""Per-key RPM/TPM limits: in Redis when configured (shared by every process), else in this process."""

from __future__ import annotations

import asyncio
import os
import sys
import textwrap
from types import SimpleNamespace

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.test import AsyncClient

from tests.fixtures_openai import make_account, start_of_a_fresh_minute
from usage import keylimits

MESSAGES = [{"role": "user", "content": "Hello there"}]
T0 = 1_800_000_000.0  # the start of a one-minute window (divisible by 60)


def key(pk: int = 1, rpm: int | None = None, tpm: int | None = None) -> SimpleNamespace:
    return SimpleNamespace(pk=pk, rpm=rpm, tpm=tpm)


async def test_rpm_refuses_the_request_over_the_limit_until_the_next_window():
    limited = key(rpm=2)
    await keylimits.acquire(limited, now=T0)
    await keylimits.acquire(limited, now=T0 + 10)
    with pytest.raises(keylimits.KeyRateLimited) as info:
        await keylimits.acquire(limited, now=T0 + 45)
    assert info.value.headers["Retry-After"] == "15" and info.value.extra == {"limit": "requests"}
    await keylimits.acquire(limited, now=T0 + 60)  # a new minute


async def test_refused_requests_do_not_use_up_the_window():
    limited = key(rpm=1)
    await keylimits.acquire(limited, now=T0)
    for _ in range(3):
        with pytest.raises(keylimits.KeyRateLimited):
            await keylimits.acquire(limited, now=T0 + 1)
    await keylimits.acquire(limited, now=T0 + 60)
    with pytest.raises(keylimits.KeyRateLimited):
        await keylimits.acquire(limited, now=T0 + 61)


async def test_keys_are_counted_apart():
    await keylimits.acquire(key(pk=1, rpm=1), now=T0)
    await keylimits.acquire(key(pk=2, rpm=1), now=T0)


async def test_tpm_counts_the_tokens_calls_used():
    limited = key(tpm=100)
    hold = await keylimits.acquire(limited, prompt_tokens=30, max_output_tokens=60, now=T0)
    assert hold.tokens == 90  # the prompt and the most the call may write, until it ends
    await keylimits.settle(hold, 80, now=T0 + 1)
    with pytest.raises(keylimits.KeyRateLimited) as info:
        await keylimits.acquire(limited, prompt_tokens=30, now=T0 + 2)
    assert info.value.extra == {"limit": "tokens"} and info.value.retryable
    await keylimits.acquire(limited, prompt_tokens=15, now=T0 + 3)  # 80 + 15 fits


async def test_concurrent_calls_see_each_others_holds():
    limited = key(tpm=100)
    first = await keylimits.acquire(limited, prompt_tokens=10, max_output_tokens=40, now=T0)
    second = await keylimits.acquire(limited, prompt_tokens=10, max_output_tokens=40, now=T0)
    assert (first.tokens, second.tokens) == (50, 50)
    with pytest.raises(keylimits.KeyRateLimited):  # all held, though nothing has been used yet
        await keylimits.acquire(limited, prompt_tokens=1, now=T0)
    await keylimits.settle(first, 20, now=T0 + 1)  # used less than it held: the rest is free again
    await keylimits.settle(first, 0, now=T0 + 1)  # settled once only
    assert (await keylimits.acquire(limited, prompt_tokens=10, now=T0 + 2)).tokens == 30


async def test_a_call_without_a_maximum_output_holds_the_rest_of_the_minute():
    limited = key(tpm=100)
    hold = await keylimits.acquire(limited, prompt_tokens=10, now=T0)
    assert hold.tokens == 100
    with pytest.raises(keylimits.KeyRateLimited):
        await keylimits.acquire(limited, prompt_tokens=10, max_output_tokens=1, now=T0)
    await keylimits.settle(hold, 40, now=T0 + 5)
    assert (await keylimits.acquire(limited, prompt_tokens=10, max_output_tokens=5, now=T0 + 6)).tokens == 15


async def test_a_prompt_larger_than_tpm_is_refused_for_good():
    with pytest.raises(keylimits.KeyRateLimited) as info:
        await keylimits.acquire(key(tpm=10), prompt_tokens=11, now=T0)
    assert not info.value.retryable and "Retry-After" not in info.value.headers


async def test_unlimited_key_is_never_counted():
    for _ in range(5):
        await keylimits.acquire(key(), prompt_tokens=10**6, now=T0)


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("close_thread_connections")
async def test_v1_answers_429_with_retry_after_in_openai_shape(fake_gpt, fake_upstream):
    account = await sync_to_async(make_account)(rpm=2)
    client = AsyncClient()
    await sync_to_async(start_of_a_fresh_minute)()
    statuses = []
    for _ in range(3):
        response = await client.post("/v1/chat/completions", {"model": "fake-gpt", "messages": MESSAGES},
                                     content_type="application/json",
                                     headers={"Authorization": account.auth})
        statuses.append(response.status_code)
    assert statuses == [200, 200, 429]
    assert 1 <= int(response["Retry-After"]) <= 60 and "x-should-retry" not in response
    assert response.json()["error"]["type"] == "requests" and response.json()["error"]["code"] == "rate_limit_exceeded"
    assert len(fake_upstream.requests) == 2


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("close_thread_connections")
async def test_v1_tpm_refuses_once_the_minute_is_spent(fake_gpt, fake_upstream):
    fake_upstream.configure("fake-gpt", tokens=50)
    account = await sync_to_async(make_account)(tpm=60)
    client = AsyncClient()
    await sync_to_async(start_of_a_fresh_minute)()
    body = {"model": "fake-gpt", "messages": MESSAGES}
    first = await client.post("/v1/chat/completions", body, content_type="application/json",
                              headers={"Authorization": account.auth})
    assert first.status_code == 200  # 9 prompt + 50 completion tokens counted
    second = await client.post("/v1/chat/completions", body, content_type="application/json",
                               headers={"Authorization": account.auth})
    assert second.status_code == 429 and second.json()["error"]["type"] == "tokens"
    assert len(fake_upstream.requests) == 1


_OTHER_PROCESS = textwrap.dedent("""
    import asyncio, sys
    from types import SimpleNamespace
    import django
    django.setup()
    from usage import keylimits
    key = SimpleNamespace(pk=7, rpm=3, tpm=None)
    async def main():
        for _ in range(2):
            await keylimits.acquire(key, now=float(sys.argv[1]))
    asyncio.run(main())
""")


@pytest.mark.redis
async def test_rpm_holds_across_processes_sharing_redis():
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "REDIS_URL": settings.REDIS_URL,
           "REDIS_KEY_PREFIX": settings.REDIS_KEY_PREFIX}
    process = await asyncio.create_subprocess_exec(sys.executable, "-c", _OTHER_PROCESS, str(T0 + 1),
                                                   cwd=str(settings.BASE_DIR), env=env)
    assert await asyncio.wait_for(process.wait(), 30) == 0
    shared = key(pk=7, rpm=3)
    await keylimits.acquire(shared, now=T0 + 2)  # the third of the window
    with pytest.raises(keylimits.KeyRateLimited):
        await keylimits.acquire(shared, now=T0 + 3)
