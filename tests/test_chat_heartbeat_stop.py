"""A reply's end never waits forever on its heartbeat, even when a beat swallows the cancel (redis-py#2028)."""

import asyncio
import time
from types import SimpleNamespace

from conversations import generation, hotpath


async def test_a_beat_that_swallows_its_cancel_neither_holds_the_end_nor_beats_again(monkeypatch, settings):
    settings.CONVERSATION_LOCK_SECONDS = 0.15  # a beat every 0.05 s
    beats: list[float] = []
    in_beat = asyncio.Event()

    async def swallowing_checkpoint(exchange, content):
        beats.append(time.monotonic())
        in_beat.set()
        try:
            await asyncio.sleep(0.3)  # a Redis command in flight when the cancel lands...
        except asyncio.CancelledError:
            pass  # ...and the client swallows it, as redis-py's asyncio client can

    monkeypatch.setattr(hotpath, "checkpoint", swallowing_checkpoint)
    heartbeat = generation._Heartbeat(SimpleNamespace(reply=SimpleNamespace(pk=1)), [])
    await asyncio.wait_for(in_beat.wait(), 2)

    started = time.monotonic()
    await asyncio.wait_for(heartbeat.stop(), 5)
    assert time.monotonic() - started <= generation.HEARTBEAT_STOP_SECONDS + 0.2
    stopped_at = time.monotonic()
    await asyncio.sleep(0.3)
    assert heartbeat.task.done()  # it ended at its next wake-up instead of beating on
    assert all(beat < stopped_at for beat in beats)


async def test_stopping_a_sleeping_heartbeat_ends_it_at_once(settings):
    settings.CONVERSATION_LOCK_SECONDS = 60
    heartbeat = generation._Heartbeat(SimpleNamespace(reply=SimpleNamespace(pk=1)), [])
    await asyncio.sleep(0)
    await asyncio.wait_for(heartbeat.stop(), 1)
    assert heartbeat.task.cancelled()
