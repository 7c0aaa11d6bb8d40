"""Two daphne processes on two ports sharing PostgreSQL and Redis, as behind a load balancer.

A conversation busy on one is busy on the other; the per-user limit of 3 holds across both (also with
no Redis at all, on PostgreSQL alone); a second tab connected to the other process sees the same stream.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request

import pytest
import websockets

from conversations.models import Conversation, Message
from tests.factories import make_api_key

pytestmark = [pytest.mark.pg, pytest.mark.django_db(transaction=True)]


def _post(base: str, path: str, body: dict, raw_key: str) -> tuple[int, dict]:
    request = urllib.request.Request(base + path, data=json.dumps(body).encode(), headers={
        "Authorization": f"Bearer {raw_key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _together(calls) -> list[tuple[int, dict]]:
    """Runs each (base, path) POST in its own thread, released at the same moment."""
    results: list = [None] * len(calls)
    barrier = threading.Barrier(len(calls))

    def run(i):
        barrier.wait(timeout=10)
        results[i] = _post(*calls[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


@pytest.mark.parametrize("shared", ["redis", "postgresql_only"])
def test_busy_and_the_per_user_limit_hold_across_two_processes(shared, daphne_processes, alice, chat_agent,
                                                               fake_upstream, settings):
    if shared == "redis" and not settings.REDIS_URL:
        pytest.skip("needs Redis (REDIS_URL)")
    env = {} if shared == "redis" else {"REDIS_URL": ""}
    one, two = daphne_processes(**env), daphne_processes(**env)
    _, raw_key = make_api_key(alice)
    fake_upstream.configure("chat-model", latency=1.0)
    conversations = [Conversation.objects.create(owner=alice, agent=chat_agent, project=f"p{i}") for i in range(4)]
    path = f"/api/conversations/{conversations[0].pk}/messages/"

    # One conversation, written to through both processes at once: one reply, the rest conversation_busy.
    results = _together([(base, path, {"content": f"q{i}"}, raw_key)
                         for i, base in enumerate([one.base_url, two.base_url] * 3)])
    assert sorted(code for code, _ in results) == [201, 409, 409, 409, 409, 409]
    assert {body["error"]["code"] for code, body in results if code == 409} == {"conversation_busy"}

    # Four conversations, two through each process: three run, the fourth is refused.
    results = _together([(base, f"/api/conversations/{c.pk}/messages/", {"content": "q"}, raw_key)
                         for base, c in zip([one.base_url, two.base_url] * 2, conversations, strict=True)])
    assert sorted(code for code, _ in results) == [201, 201, 201, 429]
    assert next(body for code, body in results if code == 429)["error"]["code"] == "too_many_concurrent"
    assert not Message.objects.filter(status=Message.Status.PROCESSING).exists()


async def _tab(url: str, origin: str, raw_key: str):
    return await websockets.connect(url, additional_headers={"Origin": origin, "Authorization": f"Bearer {raw_key}"},
                                    open_timeout=5)


async def _until_done(socket) -> list[dict]:
    frames = []
    async with asyncio.timeout(20):
        while not frames or frames[-1]["type"] not in ("done", "error"):
            frames.append(json.loads(await socket.recv()))
    return frames


@pytest.mark.redis
def test_a_second_tab_on_the_other_process_sees_the_same_stream(daphne_processes, alice, chat_agent, fake_upstream):
    one, two = daphne_processes(), daphne_processes()
    _, raw_key = make_api_key(alice)
    fake_upstream.configure("chat-model", latency=0.3, chunk_delay=0.01)
    conversation = Conversation.objects.create(owner=alice, agent=chat_agent)

    async def scenario():
        tab1 = await _tab(one.ws_url, one.base_url, raw_key)
        tab2 = await _tab(two.ws_url, two.base_url, raw_key)
        try:
            await tab2.send(json.dumps({"type": "subscribe", "conversation": conversation.pk}))
            assert json.loads(await tab2.recv()) == {"type": "subscribed", "conversation": conversation.pk}
            await tab1.send(json.dumps({"type": "message", "conversation": conversation.pk, "content": "Both tabs"}))
            return await asyncio.gather(_until_done(tab1), _until_done(tab2))
        finally:
            await tab1.close()
            await tab2.close()

    seen1, seen2 = asyncio.run(scenario())
    text1 = "".join(f["content"] for f in seen1 if f["type"] == "delta")
    text2 = "".join(f["content"] for f in seen2 if f["type"] == "delta")
    assert text1 == text2 == "Echo. System: You help alice. | User: Both tabs"
    assert seen2[0]["type"] == "status" and seen2[0]["status"] == "thinking"
    assert seen1[-1] == seen2[-1] and seen2[-1]["type"] == "done"
    deadline = time.monotonic() + 5
    while Message.objects.filter(status=Message.Status.PROCESSING).exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
