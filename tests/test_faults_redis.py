"""Redis stops mid-run and comes back: a redis-server of the test's own, stopped and restarted on its port.

While it is down, conversation locks, the per-user limit of MAX_CONCURRENT_CONVERSATIONS and message
sequence numbers are held by PostgreSQL (leases under an advisory lock, replies still `processing`,
numbers under an advisory lock with the unique constraint as the last word); the response cache serves
from its in-process tier. When Redis returns (empty: nothing is persisted) the service goes back to it
by itself, and generations begun during the outage still count.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request

import pytest
import redis
import websockets
from django.core.cache import cache

from agents.llm import service
from agents.llm.types import ChatRequest
from aiwriter import redis_guard
from conversations import locks, services
from conversations.models import Conversation, GenerationLease, Message
from tests.factories import make_api_key
from tests.fixtures_faults import use_redis

pytestmark = [pytest.mark.pg, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def short_pause(monkeypatch):
    monkeypatch.setattr(redis_guard, "PAUSE_SECONDS", 0.3)


def _conversations(owner, agent, n):
    return [Conversation.objects.create(owner=owner, agent=agent, project=f"p{i}") for i in range(n)]


def _begin(user, conversation, text="q"):
    return services.begin_exchange(user=user, conversation=conversation, content=text)


def _end(exchange):
    services.finish_reply(exchange, status=Message.Status.SUCCESS, content="a")
    services.release_lock(exchange)


def _sequences(conversation) -> list[int]:
    return list(Message.objects.filter(conversation=conversation).order_by("sequence")
                .values_list("sequence", flat=True))


def _wait_for_redis_path(user, conversation) -> services.Exchange:
    """After a restart this process tries Redis again once its pause is over."""
    deadline = time.monotonic() + 10
    while True:
        exchange = _begin(user, conversation)
        if exchange.lock.backend == "redis" or time.monotonic() > deadline:
            return exchange
        _end(exchange)
        time.sleep(0.1)


def test_locks_limits_sequences_and_cache_survive_a_redis_outage(own_redis, settings, short_pause, alice,
                                                                  chat_agent, fake_upstream):
    use_redis(settings, own_redis.url(0))
    raw = redis.Redis.from_url(own_redis.url(0))
    c1, c2, c3, c4, c5 = _conversations(alice, chat_agent, 5)

    # Redis up: the lock lives in Redis.
    first = _begin(alice, c1)
    assert first.lock.backend == "redis" and raw.exists(locks._keys(alice.pk, c1.pk)[0])
    cache.set("probe", "up")
    assert cache.get("probe") == "up"

    own_redis.stop()

    # c1's generation began on Redis; PostgreSQL still knows it runs (its reply is `processing`).
    with pytest.raises(locks.ConversationBusy):
        _begin(alice, c1)
    during = [_begin(alice, c) for c in (c2, c3)]
    assert [e.lock.backend for e in during] == ["db", "db"]
    assert GenerationLease.objects.count() == 2
    with pytest.raises(locks.TooManyConcurrent):  # c1 (Redis, gone) + c2, c3 (leases) = the limit of 3
        _begin(alice, c4)
    with pytest.raises(locks.ConversationBusy):
        _begin(alice, c2)
    # The cache degrades: the Django cache misses quietly, the response cache serves from process memory.
    assert cache.get("probe") is None
    request = ChatRequest(model="chat-model", messages=[{"role": "user", "content": "cache me"}], temperature=0)
    assert not asyncio.run(service.complete(request)).cache_hit
    assert asyncio.run(service.complete(request)).cache_hit
    _end(first)  # its release cannot reach Redis; the lock went with it anyway
    assert _sequences(c1) == [1, 2]
    _end(during[0])
    assert _sequences(c2) == [1, 2]

    own_redis.start()  # empty: the Redis counters, locks and slots are gone

    # c3's generation began on a lease during the outage: still busy, still counted.
    recovered = _wait_for_redis_path(alice, c4)
    assert recovered.lock.backend == "redis" and raw.exists(locks._keys(alice.pk, c4.pk)[0])
    with pytest.raises(locks.ConversationBusy):
        _begin(alice, c3)
    again = _begin(alice, c1)
    assert again.lock.backend == "redis"
    with pytest.raises(locks.TooManyConcurrent):  # c3 (lease) + c4 + c1 (Redis)
        _begin(alice, c5)
    for exchange in (recovered, again, during[1]):
        _end(exchange)
    # Sequence numbers carry on from the database: the empty Redis counter is seeded from it.
    nxt = _begin(alice, c2)
    _end(nxt)
    assert _sequences(c2) == [1, 2, 3, 4] and _sequences(c1) == [1, 2, 3, 4]
    assert int(raw.get(f"{settings.REDIS_KEY_PREFIX}:seq:conv:{c2.pk}")) == 4
    # The cache is shared again.
    cache.set("probe", "back")
    assert cache.get("probe") == "back" and raw.keys("*probe*")
    assert GenerationLease.objects.count() == 0 and not any(locks.is_locked(c.pk, alice.pk)
                                                             for c in (c1, c2, c3, c4, c5))


def _post(base: str, path: str, body: dict, raw_key: str) -> tuple[int, dict]:
    request = urllib.request.Request(base + path, data=json.dumps(body).encode(), headers={
        "Authorization": f"Bearer {raw_key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _post_together(base, paths, raw_key) -> list[int]:
    codes: list[int] = [0] * len(paths)
    barrier = threading.Barrier(len(paths))

    def run(i):
        barrier.wait(timeout=10)
        codes[i] = _post(base, paths[i], {"content": f"q{i}"}, raw_key)[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(paths))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return sorted(codes)


async def _ws_chat(ws_url: str, origin: str, raw_key: str, conversation_id: int) -> list[dict]:
    headers = {"Origin": origin, "Authorization": f"Bearer {raw_key}"}
    async with websockets.connect(ws_url, additional_headers=headers, open_timeout=5) as socket:
        await socket.send(json.dumps({"type": "message", "conversation": conversation_id, "content": "ws hi"}))
        frames = []
        async with asyncio.timeout(20):
            while not frames or frames[-1]["type"] not in ("done", "error"):
                frames.append(json.loads(await socket.recv()))
        return frames


def test_a_server_keeps_its_guarantees_through_a_redis_outage_and_recovers(own_redis, daphne_processes, alice,
                                                                         chat_agent, fake_upstream):
    daphne = daphne_processes(REDIS_URL=own_redis.url(0))
    _, raw_key = make_api_key(alice)
    fake_upstream.configure("chat-model", latency=0.5)
    conversations = _conversations(alice, chat_agent, 4)
    paths = [f"/api/conversations/{c.pk}/messages/" for c in conversations]

    assert asyncio.run(_ws_chat(daphne.ws_url, daphne.base_url, raw_key, conversations[0].pk))[-1]["type"] == "done"
    own_redis.stop()

    # One conversation, six requests at once: one reply, five 409s — held by PostgreSQL now.
    assert _post_together(daphne.base_url, [paths[1]] * 6, raw_key) == [201, 409, 409, 409, 409, 409]
    # Four conversations at once: the per-user limit of 3 holds.
    assert _post_together(daphne.base_url, paths, raw_key) == [201, 201, 201, 429]
    # A websocket chat without the channel layer: the reply streams to its own socket.
    frames = asyncio.run(_ws_chat(daphne.ws_url, daphne.base_url, raw_key, conversations[3].pk))
    assert frames[-1]["type"] == "done" and "delta" in [f["type"] for f in frames], frames
    own_redis.start()

    # Back by itself: websockets (the channel layer) work again, and the limit holds on Redis.
    deadline = time.monotonic() + 30
    while True:
        try:
            frames = asyncio.run(_ws_chat(daphne.ws_url, daphne.base_url, raw_key, conversations[2].pk))
            break
        except (OSError, websockets.WebSocketException, TimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    assert frames[-1]["type"] == "done" and frames[-1]["status"] == "success", frames
    assert _post_together(daphne.base_url, paths, raw_key) == [201, 201, 201, 429]
    for conversation in conversations:
        sequences = _sequences(conversation)
        assert sequences == list(range(1, len(sequences) + 1))  # unique, gap-free
    assert not Message.objects.filter(status=Message.Status.PROCESSING).exists()
    assert GenerationLease.objects.count() == 0

