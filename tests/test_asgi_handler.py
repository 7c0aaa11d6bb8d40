"""aiwriter.asgi_handler: Django's ASGI handling without a worker thread per request when nothing needs one."""

from __future__ import annotations

import threading

import httpx2
import openai
import pytest
from asgiref.sync import ThreadSensitiveContext, sync_to_async
from django.core.signals import request_finished, request_started

from aiwriter import dbpool
from aiwriter.asgi_handler import LoopASGIHandler, _worker_thread_started
from devtools.fake_openai import echo_text

MESSAGES = [{"role": "user", "content": "Hello there"}]


@pytest.fixture
async def app_client():
    """An httpx2 client on LoopASGIHandler in this process; closed at the end of the test."""
    client = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=LoopASGIHandler()), base_url="http://testserver")
    yield client
    await client.aclose()


@pytest.fixture
def thread_starts(monkeypatch):
    """The names of the threads started while the test runs (Thread.start still starts them)."""
    names: list[str] = []
    start = threading.Thread.start

    def counting_start(thread: threading.Thread) -> None:
        names.append(thread.name)
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", counting_start)
    return names


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("close_thread_connections")
async def test_a_warm_v1_call_starts_no_thread(openai_account, fake_gpt, fake_upstream, app_client, thread_starts):
    if not dbpool.enabled():
        pytest.skip("without the async pool (PostgreSQL) metering takes the sync path, in a worker thread")
    sdk = openai.AsyncOpenAI(base_url="http://testserver/v1", api_key=openai_account.raw, max_retries=0,
                             http_client=app_client)
    await sdk.chat.completions.create(model="fake-gpt", messages=MESSAGES)  # warms the key, target and price caches
    thread_starts.clear()
    reply = await sdk.chat.completions.create(model="fake-gpt", messages=MESSAGES)
    stream = await sdk.chat.completions.create(model="fake-gpt", messages=MESSAGES, stream=True)
    streamed = "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
    assert reply.choices[0].message.content == streamed == echo_text(MESSAGES)
    assert thread_starts == []


async def test_the_worker_thread_is_seen_once_sync_code_ran_in_it():
    """What the handler's choice rests on: asgiref keeps a request context's worker executor where we look."""
    async with ThreadSensitiveContext():
        assert not _worker_thread_started()
        await sync_to_async(lambda: None)()
        assert _worker_thread_started()


@pytest.mark.django_db
async def test_other_receivers_of_the_request_signals_still_run_off_the_loop(app_client):
    loop_thread = threading.get_ident()
    seen: dict[str, int] = {}

    def started(**kwargs):
        seen["started"] = threading.get_ident()

    def finished(**kwargs):
        seen["finished"] = threading.get_ident()

    request_started.connect(started)
    request_finished.connect(finished)
    try:
        response = await app_client.get("/healthz")
    finally:
        request_started.disconnect(started)
        request_finished.disconnect(finished)
    assert response.status_code == 200
    assert set(seen) == {"started", "finished"} and loop_thread not in seen.values()


@pytest.mark.django_db
async def test_a_form_post_without_its_csrf_token_is_still_refused(app_client):
    response = await app_client.post("/accounts/login/", data={"username": "a", "password": "b"})
    assert response.status_code == 403


@pytest.mark.django_db
async def test_a_sync_view_is_served_and_closed_in_its_worker_thread(app_client):
    response = await app_client.get("/accounts/login/")
    assert response.status_code == 200 and "csrftoken" in response.cookies
