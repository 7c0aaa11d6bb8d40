"""Many calls that meet the same expired cache entry share one load (aiwriter.singleflight): at 1,000 concurrent
chats every expiry of a model's route made each call load it again, one thread hop each, queued in turn."""

from __future__ import annotations

import asyncio

import pytest
from asgiref.sync import sync_to_async

from agents.llm import registry
from aiwriter.singleflight import shared_load
from tests.factories import make_model


async def test_concurrent_callers_share_one_load_and_its_result():
    loads = 0

    async def load() -> str:
        nonlocal loads
        loads += 1
        await asyncio.sleep(0.05)
        return "value"

    results = await asyncio.gather(*(shared_load("k", load) for _ in range(50)))
    assert results == ["value"] * 50 and loads == 1
    assert await shared_load("k", load) == "value" and loads == 2  # a later caller loads afresh


async def test_every_waiter_gets_the_error_and_a_cancelled_waiter_does_not_cancel_the_load():
    started = asyncio.Event()

    async def failing() -> str:
        started.set()
        await asyncio.sleep(0.05)
        raise ValueError("no such thing")

    first = asyncio.ensure_future(shared_load("bad", failing))
    await started.wait()
    others = [asyncio.ensure_future(shared_load("bad", failing)) for _ in range(5)]
    first.cancel()
    outcomes = await asyncio.gather(first, *others, return_exceptions=True)
    assert isinstance(outcomes[0], asyncio.CancelledError)
    assert all(isinstance(o, ValueError) for o in outcomes[1:])


@pytest.mark.django_db(transaction=True)
async def test_an_expired_route_takes_one_thread_hop_for_many_calls(monkeypatch):
    await sync_to_async(make_model)("herd-model")
    calls = 0
    real = registry.get_route_sync

    def counted(name):
        nonlocal calls
        calls += 1
        return real(name)

    monkeypatch.setattr(registry, "get_route_sync", counted)
    registry._routes.clear()
    routes = await asyncio.gather(*(registry.get_route("herd-model") for _ in range(40)))
    assert calls == 1 and {id(r) for r in routes} == {id(routes[0])}
