"""Per-deployment limits hold across two OS processes sharing Redis, through the whole service path.

The child is a second Python process with its own Django, route cache and event loop; it reads the same
(committed) test database and Redis db, and calls the same fake upstream over loopback.
"""

import asyncio
import json
import os
import subprocess
import sys
import textwrap

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings as django_settings
from django.db import connection

from agents.llm import service
from agents.llm.types import ChatRequest, RateLimited
from tests.factories import make_fake_model, make_provider

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.pg, pytest.mark.redis,
              pytest.mark.usefixtures("close_thread_connections")]

MESSAGES = [{"role": "user", "content": "hello"}]

_CHILD = textwrap.dedent("""
    import asyncio, json, sys
    import django
    django.setup()
    from django.conf import settings
    from agents.llm import service
    from agents.llm.types import ChatRequest, RateLimited

    settings.LLM_RATE_LIMIT_MAX_WAIT = 0  # refuse at once instead of waiting for a slot

    async def main(model, calls):
        ok = limited = 0
        for _ in range(calls):
            try:
                await service.complete(ChatRequest(model=model, messages=[{"role": "user", "content": "hello"}]))
                ok += 1
            except RateLimited:
                limited += 1
        print(json.dumps({"ok": ok, "limited": limited}))

    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
""")


@pytest.fixture(autouse=True)
def _no_waiting(settings):
    settings.LLM_RATE_LIMIT_MAX_WAIT = 0


def _child_env() -> dict[str, str]:
    db = connection.settings_dict  # the test database (test_<name>), whose rows this test has committed
    host = f"{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}"
    url = f"postgres://{db['USER']}:{db['PASSWORD'] or ''}@{host}/{db['NAME']}"
    return {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "DATABASE_URL": url,
            "REDIS_URL": django_settings.REDIS_URL, "REDIS_KEY_PREFIX": django_settings.REDIS_KEY_PREFIX}


async def _run_child(model: str, calls: int) -> dict[str, int]:
    env = await sync_to_async(_child_env)()
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CHILD, model, str(calls), env=env, cwd=django_settings.BASE_DIR,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(child.communicate(), 120)
    assert child.returncode == 0, err.decode()[-3000:]
    return json.loads(out.decode().strip().splitlines()[-1])


@sync_to_async
def _limited_model(fake_upstream, **limits):
    provider = make_provider(kind="openai", base_url=fake_upstream.base_url, api_key="k", **limits)
    return make_fake_model(fake_upstream, "shared-limit", upstream_model="l", provider=provider)


async def test_rpm_holds_across_two_processes(fake_upstream):
    model = await _limited_model(fake_upstream, rpm=6)
    for _ in range(3):
        await service.complete(ChatRequest(model=model.name, messages=MESSAGES))
    child = await _run_child(model.name, 6)
    assert child == {"ok": 3, "limited": 3}  # the child saw the parent's three requests in Redis
    with pytest.raises(RateLimited):  # and the parent sees the child's
        await service.complete(ChatRequest(model=model.name, messages=MESSAGES))
    assert fake_upstream.served["l"] == 6 and len(fake_upstream.requests) == 6


async def test_concurrency_slot_held_by_one_process_refuses_the_other(fake_upstream):
    model = await _limited_model(fake_upstream, max_concurrency=1)
    fake_upstream.configure("l", tokens=2, latency=60)
    busy = asyncio.create_task(service.complete(ChatRequest(model=model.name, messages=MESSAGES)))
    try:
        for _ in range(500):
            if fake_upstream.requests:
                break
            await asyncio.sleep(0.01)
        assert fake_upstream.requests, "the parent's call never reached the upstream"
        assert await _run_child(model.name, 1) == {"ok": 0, "limited": 1}
    finally:
        busy.cancel()
        with pytest.raises(asyncio.CancelledError):
            await busy
    fake_upstream.configure("l", latency=0)
    assert await _run_child(model.name, 1) == {"ok": 1, "limited": 0}  # the slot came back when the call ended
    assert len(fake_upstream.requests) == 2
