"""6. Response cache: hit latency of each tier, and the hit rate on a Zipf-distributed repeated-prompt load.

Tiers: a prompt asked twice of one process is a memory hit; the same prompt then asked of the other
daphne process (whose memory has not seen it) is a shared-tier (Redis) hit. Cached requests are the
deterministic ones (temperature 0). The hit rate is read from the x-aiwriter-cache header and checked
against the requests the fake upstream saw.
"""

from __future__ import annotations

import random

from bench.harness import BenchResult, percentile
from bench.setup import CACHE, Context, start_server

ZIPF_S = 1.1
SEED = 3


def _body(prompt: str) -> dict:
    return {"model": CACHE, "messages": [{"role": "user", "content": prompt}], "temperature": 0}


def run(ctx: Context) -> BenchResult:
    result = BenchResult("6", "Response cache: tier hit latency and Zipf hit rate")
    while len(ctx.servers) < 2:
        start_server(ctx)
    targets = [ctx.gateway(CACHE, server=0), ctx.gateway(CACHE, server=1), ctx.direct(CACHE)]
    probes = 30 if ctx.quick else 150
    items = []
    for i in range(probes):
        body = _body(f"cache tier probe {i}")
        direct_body = {**body, "model": CACHE}
        items += [[2, direct_body, "direct"], [0, body, "miss"], [0, body, "memory hit"], [1, body, "shared hit"]]
    tiers = ctx.load({"op": "replay", "targets": targets, "items": items,
                      "max_seconds": ctx.allowance(60) * 0.3})["labels"]
    direct = percentile(tiers["direct"]["lat"], 50)
    for label in ("miss", "memory hit", "shared hit"):
        bucket = tiers.get(label)
        if not bucket or not bucket["lat"]:
            continue
        p50 = percentile(bucket["lat"], 50)
        result.add(f"{label}: p50 latency", p50, "ms", note=f"{p50 - direct:+.2f} vs direct upstream "
                   f"({direct:.2f}); x-aiwriter-cache {bucket['cache']}")

    # Zipf workload over both processes.
    rng = random.Random(SEED)
    vocabulary = 200 if ctx.quick else 500
    n = 800 if ctx.quick else 2500
    weights = [1 / (k ** ZIPF_S) for k in range(1, vocabulary + 1)]
    picks = rng.choices(range(vocabulary), weights=weights, k=n)
    before = ctx.upstream_served().get(CACHE, 0)
    items = [[i % 2, _body(f"zipf prompt {k}"), "zipf"] for i, k in enumerate(picks)]
    zipf = ctx.load({"op": "replay", "targets": targets, "items": items, "max_seconds": ctx.allowance(90)},
                    timeout=300)["labels"]
    bucket = zipf["zipf"]
    hits, misses = bucket["cache"].get("hit", 0), bucket["cache"].get("miss", 0)
    upstream_calls = ctx.upstream_served().get(CACHE, 0) - before
    done = len(bucket["lat"])
    ideal = 1 - len(set(picks)) / n
    if hits + misses:
        result.add("Zipf hit rate (x-aiwriter-cache)", hits / (hits + misses) * 100, "%", (">", 80),
                   note=f"{n:,} requests over {vocabulary} prompts, s={ZIPF_S}; an unbounded cache would hit "
                   f"{ideal * 100:.1f} %")
    if done:
        result.add("Zipf hit rate (upstream calls saved)", (1 - upstream_calls / done) * 100, "%",
                   note=f"{upstream_calls} upstream calls for {done} requests")
    result.add("Zipf: p50 latency", percentile(bucket["lat"], 50), "ms")
    result.add("errors", bucket["errors"] + sum(t["errors"] for t in tiers.values()), "", ("==", 0))
    result.details["errors"] = bucket["error_samples"]
    return result
