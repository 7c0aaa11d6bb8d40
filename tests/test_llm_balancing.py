"""Load balancing among a model's deployments, through the real openai SDK against the fake upstream."""

import asyncio
import random

import pytest
from asgiref.sync import sync_to_async

from agents.llm import service
from agents.llm.types import ChatRequest
from agents.models import LLMModel
from tests.factories import add_fake_deployment

pytestmark = pytest.mark.django_db(transaction=True)

MESSAGES = [{"role": "user", "content": "hi"}]


@sync_to_async
def _model(fake_upstream, strategy: str, weights: dict[str, int]) -> LLMModel:
    model = LLMModel.objects.create(name=f"bal-{strategy}", strategy=strategy)
    for upstream, weight in weights.items():
        add_fake_deployment(fake_upstream, model, upstream, weight=weight)
    return model


async def _spread(fake_upstream, model: LLMModel, calls: int) -> dict[str, int]:
    for name in ("a", "b"):
        fake_upstream.configure(name, tokens=1)
    for _ in range(calls):
        await service.complete(ChatRequest(model=model.name, messages=MESSAGES))
    return dict(fake_upstream.served)


async def test_weighted_three_to_one_over_400_calls(fake_upstream):
    model = await _model(fake_upstream, "weighted", {"a": 3, "b": 1})
    served = await _spread(fake_upstream, model, 400)
    assert abs(served["a"] - 300) <= 20 and abs(served["b"] - 100) <= 20, served


async def test_smooth_weighted_interleaves_instead_of_bursting(fake_upstream):
    model = await _model(fake_upstream, "weighted", {"a": 3, "b": 1})
    await _spread(fake_upstream, model, 8)
    order = [r["model"] for r in fake_upstream.requests]
    assert order == ["a", "a", "b", "a", "a", "a", "b", "a"]  # nginx's smooth sequence for 3:1


async def test_round_robin_alternates(fake_upstream):
    model = await _model(fake_upstream, "round_robin", {"a": 5, "b": 1})
    served = await _spread(fake_upstream, model, 40)
    assert served == {"a": 20, "b": 20}


async def test_random_follows_weights(fake_upstream):
    random.seed(20261125)
    model = await _model(fake_upstream, "random", {"a": 3, "b": 1})
    served = await _spread(fake_upstream, model, 400)
    assert abs(served["a"] - 300) <= 20 and abs(served["b"] - 100) <= 20, served


async def test_least_connections_avoids_the_busy_deployment(fake_upstream):
    model = await _model(fake_upstream, "least_connections", {"a": 1, "b": 1})
    fake_upstream.configure("a", tokens=1, latency=1.0)
    fake_upstream.configure("b", tokens=1)
    slow = asyncio.create_task(service.complete(ChatRequest(model=model.name, messages=MESSAGES)))
    for _ in range(100):
        if fake_upstream.requests:
            break
        await asyncio.sleep(0.01)
    assert fake_upstream.requests[0]["model"] == "a"
    for _ in range(5):
        result = await service.complete(ChatRequest(model=model.name, messages=MESSAGES))
        assert result.upstream_model == "b"
    assert (await slow).upstream_model == "a"
