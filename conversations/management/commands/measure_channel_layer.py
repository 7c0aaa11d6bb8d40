"""Measures what one streamed delta costs in each channel layer (the numbers in docs/chat.md).

For every layer: `--deltas` group_sends in a row to a group of `--members` channels (the cost per delta
while a reply streams), then `--round-trips` single send → receive round trips (p50 / p95 latency).
The Redis layers need REDIS_URL; they use a throwaway key prefix, so a running server is not disturbed.
"""

from __future__ import annotations

import asyncio
import secrets
import statistics
import time
from typing import Any

from channels.layers import InMemoryChannelLayer
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

RECEIVE_TIMEOUT = 10.0


def _layers(redis_url: str) -> dict[str, Any]:
    layers: dict[str, Any] = {}
    if redis_url:
        from channels_redis.core import RedisChannelLayer
        from channels_redis.pubsub import RedisPubSubChannelLayer

        prefix = f"{settings.REDIS_KEY_PREFIX}:measure:{secrets.token_hex(4)}"
        layers["RedisPubSubChannelLayer"] = RedisPubSubChannelLayer(hosts=[redis_url], prefix=prefix)
        layers["channels_redis.core.RedisChannelLayer"] = RedisChannelLayer(hosts=[redis_url], prefix=prefix)
    layers["InMemoryChannelLayer"] = InMemoryChannelLayer()
    return layers


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


async def measure(layer: Any, *, deltas: int, round_trips: int, members: int) -> dict[str, float]:
    """Milliseconds: mean group_send per delta in a burst, and p50/p95 of single send → receive."""
    group = "measure." + secrets.token_hex(4)
    channels = [await layer.new_channel() for _ in range(members)]
    for channel in channels:
        await layer.group_add(group, channel)
    try:
        # Pub/sub subscribes on the first receive: warm every member up before timing.
        await layer.group_send(group, {"type": "chat.frame", "n": -1})
        for channel in channels:
            await asyncio.wait_for(layer.receive(channel), RECEIVE_TIMEOUT)

        started = time.perf_counter()
        for n in range(deltas):
            await layer.group_send(group, {"type": "chat.frame", "frame": {"type": "delta", "content": "tok"}, "n": n})
        per_delta = (time.perf_counter() - started) * 1000 / deltas
        for channel in channels:  # every delta arrives, in order
            got = [(await asyncio.wait_for(layer.receive(channel), RECEIVE_TIMEOUT))["n"] for _ in range(deltas)]
            if got != list(range(deltas)):
                raise CommandError(f"deltas arrived out of order or lost: {got[:10]}…")

        latencies = []
        for n in range(round_trips):
            started = time.perf_counter()
            await layer.group_send(group, {"type": "chat.frame", "n": n})
            await asyncio.wait_for(layer.receive(channels[0]), RECEIVE_TIMEOUT)
            latencies.append((time.perf_counter() - started) * 1000)
            for channel in channels[1:]:
                await asyncio.wait_for(layer.receive(channel), RECEIVE_TIMEOUT)
    finally:
        for channel in channels:
            await layer.group_discard(group, channel)
        flush = getattr(layer, "flush", None)
        if flush is not None:
            await flush()
    return {"per_delta_ms": per_delta, "p50_ms": statistics.median(latencies),
            "p95_ms": _percentile(latencies, 0.95)}


class Command(BaseCommand):
    help = "Measure the per-delta cost of group_send in each channel layer (pub/sub, core, in-memory)."

    def add_arguments(self, parser):
        parser.add_argument("--deltas", type=int, default=90, help="group_sends in a row (default 90)")
        parser.add_argument("--round-trips", type=int, default=100, help="single round trips (default 100)")
        parser.add_argument("--members", type=int, default=1, help="channels in the group, e.g. 2 tabs (default 1)")

    def handle(self, *args, deltas: int, round_trips: int, members: int, **options):
        if min(deltas, round_trips, members) < 1:
            raise CommandError("--deltas, --round-trips and --members must be at least 1.")
        if not settings.REDIS_URL:
            self.stdout.write("REDIS_URL is unset: measuring the in-memory layer only.")

        async def run_all() -> dict[str, dict[str, float]]:
            return {name: await measure(layer, deltas=deltas, round_trips=round_trips, members=members)
                    for name, layer in _layers(settings.REDIS_URL).items()}

        results = asyncio.run(run_all())
        self.stdout.write(f"{deltas} deltas in a row, then {round_trips} round trips, {members} member(s):")
        self.stdout.write("| layer | group_send per delta | send → receive p50 / p95 |")
        self.stdout.write("|---|---|---|")
        for name, r in results.items():
            self.stdout.write(f"| `{name}` | {r['per_delta_ms']:.2f} ms "
                              f"| {r['p50_ms']:.2f} ms / {r['p95_ms']:.2f} ms |")
