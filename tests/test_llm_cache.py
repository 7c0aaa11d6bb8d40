"""The two-tier response cache: same content on a hit, at zero tokens, visible in stats; clearing by tier."""

import pytest
from asgiref.sync import sync_to_async

from agents.llm import cache, service
from agents.llm.types import ChatRequest, ChatResult, TextDelta
from tests.factories import make_fake_model

pytestmark = pytest.mark.django_db(transaction=True)

MESSAGES = [{"role": "user", "content": "Name three rivers"}]


@pytest.fixture
async def model(fake_upstream):
    fake_upstream.configure("c", tokens=12)
    return await sync_to_async(make_fake_model)(fake_upstream, "cache-m", upstream_model="c")


def _req(model, **kw) -> ChatRequest:
    return ChatRequest(model=model.name, messages=MESSAGES, **kw)


async def test_hit_returns_same_content_at_zero_cost_and_shows_in_stats(fake_upstream, model):
    first = await service.complete(_req(model, temperature=0))
    second = await service.complete(_req(model, temperature=0))
    assert second.cache_hit is True and first.cache_hit is False
    assert second.content == first.content and second.usage.total_tokens == 0
    assert fake_upstream.served["c"] == 1
    stats = cache.response_cache.stats()
    assert stats["hits"] == 1 and stats["misses"] == 1 and stats["size"]["memory"] == 1


async def test_hit_is_streamed_as_deltas(fake_upstream, model):
    first = await service.complete(_req(model, temperature=0))
    items = [i async for i in service.stream(_req(model, temperature=0))]
    assert isinstance(items[-1], ChatResult) and items[-1].cache_hit
    deltas = [i.content for i in items if isinstance(i, TextDelta)]
    assert len(deltas) >= 2 and "".join(deltas) == first.content


async def test_only_deterministic_requests_are_cached(fake_upstream, model):
    await service.complete(_req(model, temperature=0.7))
    await service.complete(_req(model, temperature=0.7))
    await service.complete(_req(model))
    assert fake_upstream.served["c"] == 3
    await service.complete(_req(model, temperature=0.7, cache=True))
    assert (await service.complete(_req(model, temperature=0.7, cache=True))).cache_hit
    await service.complete(_req(model, temperature=0, cache=False))
    assert fake_upstream.served["c"] == 5


async def test_key_covers_sampling_options(fake_upstream, model):
    await service.complete(_req(model, temperature=0, max_tokens=5))
    other = await service.complete(_req(model, temperature=0, max_tokens=6))
    assert other.cache_hit is False and fake_upstream.served["c"] == 2


async def test_second_tier_serves_after_memory_is_cleared(fake_upstream, model):
    await service.complete(_req(model, temperature=0))
    assert cache.response_cache.clear(tier="memory") == {"memory": 1}
    again = await service.complete(_req(model, temperature=0))
    assert again.cache_hit and cache.response_cache.stats()["redis_hits"] == 1


async def test_clear_by_pattern_and_tier(fake_upstream, model):
    await service.complete(_req(model, temperature=0))
    assert await sync_to_async(cache.response_cache.clear)("other-model:*") == {"memory": 0, "redis": 0}
    assert await sync_to_async(cache.response_cache.clear)("cache-m:*") == {"memory": 1, "redis": 1}
    assert (await service.complete(_req(model, temperature=0))).cache_hit is False


@pytest.mark.redis
async def test_redis_tier_is_shared_through_redis(fake_upstream, model):
    from aiwriter.redis import get_redis

    await service.complete(_req(model, temperature=0))
    assert any(b"llmcache" in k for k in get_redis().keys("*"))


def test_memory_tier_expires_entries_and_evicts_the_least_recently_used(monkeypatch):
    tier = cache.MemoryTier(max_entries=2, ttl=10)
    now = [1000.0]
    monkeypatch.setattr(cache.time, "monotonic", lambda: now[0])
    tier.set("m:a", {"content": "a"})
    tier.set("m:b", {"content": "b"})
    assert tier.get("m:a") == {"content": "a"}  # a is now the most recently used
    tier.set("m:c", {"content": "c"})
    assert tier.get("m:b") is None and tier.get("m:a") and tier.get("m:c")
    now[0] += 11
    assert tier.get("m:a") is None and tier.size() == 1
