"""The channel layer under a stream: the per-delta measurement command, and batching when a layer is slow."""

import asyncio
from io import StringIO

import pytest
from channels.layers import InMemoryChannelLayer
from django.core.management import call_command

from aiwriter import redis as shared_redis
from conversations.fanout import GroupSender


@pytest.mark.redis
def test_measure_channel_layer_reports_every_layer_and_leaves_no_keys(settings):
    out = StringIO()
    call_command("measure_channel_layer", "--deltas", "20", "--round-trips", "10", "--members", "2", stdout=out)
    rows = [line for line in out.getvalue().splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == [
        "RedisPubSubChannelLayer", "channels_redis.core.RedisChannelLayer", "InMemoryChannelLayer"]
    assert all(row.count(" ms") == 3 for row in rows)
    assert list(shared_redis.get_redis().scan_iter(f"{settings.REDIS_KEY_PREFIX}:measure:*")) == []


def test_measure_channel_layer_without_redis(settings):
    settings.REDIS_URL = ""
    out = StringIO()
    call_command("measure_channel_layer", "--deltas", "5", "--round-trips", "5", stdout=out)
    assert "in-memory layer only" in out.getvalue() and "| `InMemoryChannelLayer` |" in out.getvalue()


class SlowLayer(InMemoryChannelLayer):
    """An in-memory layer whose group_send takes as long as a slow Redis (channels_redis #83)."""

    async def group_send(self, group, message):
        await asyncio.sleep(0.02)
        await super().group_send(group, message)


async def test_a_slow_layer_gets_merged_deltas_in_order_and_the_asking_socket_every_frame_at_once():
    layer = SlowLayer()
    channel = await layer.new_channel()  # another tab
    await layer.group_add("chat.conv.1", channel)
    direct: list[dict] = []

    async def deliver(frame):
        direct.append(frame)

    sender = GroupSender(layer, "chat.conv.1", origin="asking-socket", deliver=deliver)
    await sender.emit({"type": "status", "status": "generating", "conversation": 1, "message": 9})
    words = [f"w{n} " for n in range(60)]
    for word in words:  # the model streams faster than the layer sends
        await sender.emit({"type": "delta", "message": 9, "content": word})
        await asyncio.sleep(0.001)
        assert direct[-1]["content"] == word  # the asking socket never waits on the layer
    await sender.emit({"type": "done", "message": 9, "status": "success"})
    await sender.close(timeout=10)
    assert [f["content"] for f in direct if f["type"] == "delta"] == words and direct[-1]["type"] == "done"

    frames = []
    while True:
        event = await asyncio.wait_for(layer.receive(channel), 5)
        assert event["origin"] == "asking-socket"  # so the asking socket skips its own frames from the group
        frames.append(event["frame"])
        if frames[-1]["type"] == "done":
            break
    deltas = [f for f in frames if f["type"] == "delta"]
    assert frames[0]["type"] == "status" and frames[-1]["type"] == "done"
    assert "".join(f["content"] for f in deltas) == "".join(words)  # every word, in order
    assert 1 < len(deltas) < len(words)  # streamed on, merging what piled up while a send was in flight


class DeadLayer(InMemoryChannelLayer):
    async def group_send(self, group, message):
        await asyncio.sleep(3600)  # a layer that never answers


async def test_a_layer_that_never_answers_costs_the_asking_socket_nothing():
    direct: list[dict] = []

    async def deliver(frame):
        direct.append(frame)

    sender = GroupSender(DeadLayer(), "chat.conv.2", origin="asking-socket", deliver=deliver)
    for frame in ({"type": "delta", "message": 1, "content": "a"}, {"type": "done", "message": 1}):
        await sender.emit(frame)
    await sender.close(timeout=0.1)  # gives up on the group only
    assert [f["type"] for f in direct] == ["delta", "done"]
