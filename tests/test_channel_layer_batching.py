"""The pub/sub channel layer under many publishes: batched, in order, and never ahead of a group join."""

import asyncio
import time

import pytest
from django.conf import settings

from aiwriter import redis as shared_redis
from aiwriter.channel_layer import ResilientPubSubChannelLayer

pytestmark = pytest.mark.redis


def _layer(tag: str) -> ResilientPubSubChannelLayer:
    return ResilientPubSubChannelLayer(hosts=[settings.REDIS_URL], prefix=f"{settings.REDIS_KEY_PREFIX}:{tag}")


async def _receive_all(layer, channel, count):
    return [await asyncio.wait_for(layer.receive(channel), 5) for _ in range(count)]


async def test_concurrent_group_sends_arrive_once_each_in_order():
    layer = _layer("batch-order")
    try:
        listener = await layer.new_channel()
        await layer.group_add("g", listener)
        await asyncio.gather(*(layer.group_send("g", {"type": "chat.frame", "n": n}) for n in range(300)))
        got = await _receive_all(layer, listener, 300)
        assert [event["n"] for event in got] == list(range(300))
    finally:
        await layer.flush()


async def test_a_group_join_does_not_wait_behind_publishes_in_flight():
    # Redis holds every write (PUBLISH) for 400 ms; a SUBSCRIBE is not a write. Under channels_redis's shard lock
    # the join waited for the publishes queued before it.
    layer = _layer("batch-join")
    pause = shared_redis.get_redis()
    try:
        listener = await layer.new_channel()
        await layer.group_add("busy", listener)
        await asyncio.to_thread(pause.execute_command, "CLIENT", "PAUSE", "400", "WRITE")
        publishes = [asyncio.create_task(layer.group_send("busy", {"type": "chat.frame", "n": n})) for n in range(50)]
        await asyncio.sleep(0.05)  # the first batch is in flight, the rest queued behind it
        started = time.monotonic()
        newcomer = await layer.new_channel()  # a socket opening
        await layer.group_add("other", newcomer)  # and its first turn joining its conversation's group
        joined_in = time.monotonic() - started
        assert joined_in < 0.2, f"group_add waited {joined_in:.3f}s behind publishes"
        await asyncio.wait_for(asyncio.gather(*publishes), 5)
        assert [event["n"] for event in await _receive_all(layer, listener, 50)] == list(range(50))
    finally:
        await asyncio.to_thread(pause.execute_command, "CLIENT", "UNPAUSE")
        await layer.flush()


async def test_publishes_to_an_unreachable_redis_fail_each_publisher():
    layer = ResilientPubSubChannelLayer(hosts=["redis://127.0.0.1:1/0"], prefix="unreachable")
    results = await asyncio.gather(*(layer.group_send("g", {"type": "x"}) for _ in range(5)), return_exceptions=True)
    assert len(results) == 5 and all(isinstance(r, OSError | ConnectionError) or "Connect" in type(r).__name__
                                     for r in results)
    # The batch that failed leaves nothing behind: the next publish is tried again (and fails again, not hangs).
    with pytest.raises(Exception):  # noqa: B017,PT011 - redis' ConnectionError
        await asyncio.wait_for(layer.group_send("g", {"type": "x"}), 5)
    await layer.flush()
