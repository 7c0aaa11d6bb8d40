"""Websocket turn starts are admitted a few at a time per process, in the order they came (conversations.admission)."""

import asyncio

from conversations import admission


async def _burst(n: int) -> tuple[int, list[int]]:
    running, peak, order = 0, 0, []

    async def start(i: int) -> None:
        nonlocal running, peak
        async with admission.turn_start():
            order.append(i)
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.01)
            running -= 1

    tasks = []
    for i in range(n):
        tasks.append(asyncio.create_task(start(i)))
        await asyncio.sleep(0)  # they arrive one after another
    await asyncio.gather(*tasks)
    return peak, order


async def test_at_most_the_setting_begin_at_once_in_arrival_order(settings):
    settings.WS_TURN_STARTS_AT_ONCE = 3
    peak, order = await _burst(12)
    assert peak == 3
    assert order == list(range(12))


async def test_zero_admits_every_turn_at_once(settings):
    settings.WS_TURN_STARTS_AT_ONCE = 0
    peak, _ = await _burst(12)
    assert peak == 12
