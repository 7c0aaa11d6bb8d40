"""5. /api/usage/stats/ for a year of a busy user at 10k, 1M and 10M usage records (capped by --max-rows)."""

from __future__ import annotations

from datetime import date, timedelta

from bench.data import count_usage, insert_usage, rebuild_rollups
from bench.harness import BenchResult, percentile
from bench.setup import Context

LEVELS = (10_000, 1_000_000, 10_000_000)


def run(ctx: Context) -> BenchResult:
    result = BenchResult("5", "Usage statistics at scale (/api/usage/stats/, one year)")
    cap = 200_000 if ctx.quick else ctx.args.max_rows
    levels = [n for n in LEVELS if n <= cap] or [LEVELS[0]]
    if cap < LEVELS[-1]:
        if cap > levels[-1]:
            levels.append(cap)
        result.notes.append(f"row cap {cap:,} (--max-rows): levels above it not run; 10M needs --max-rows 10000000")
    user = ctx.users["stats"]
    today = date.today()
    query = f"?start={(today - timedelta(days=365)).isoformat()}&end={today.isoformat()}"
    target = {"method": "GET", "url": f"{ctx.servers[0][0]}/api/usage/stats/{query}",
              "headers": {"Authorization": f"Bearer {user.key}"}}
    p50s: dict[int, float] = {}
    have = 0
    for level in levels:
        t_insert = insert_usage(user_id=user.id, rows=level - have)
        have = level
        t_rollup = rebuild_rollups(user_id=user.id)
        out = ctx.load({"op": "seq", "n": 10 if ctx.quick else 40, "warmup": 3, "targets": [target]})
        bucket = out["targets"][0]
        if bucket["errors"] and not bucket["lat"]:
            raise RuntimeError(f"stats endpoint failed: {bucket['error_samples'][:2]}")
        p50s[level] = percentile(bucket["lat"], 50)
        result.add(f"stats p50 at {level:,} records", p50s[level], "ms", ("<=", 100) if level == levels[-1] else None,
                   note=f"p99 {percentile(bucket['lat'], 99):.1f} ms; DB queries {max(bucket['db_queries'] or [0])}")
        result.details[str(level)] = {"insert_seconds": round(t_insert, 1), "rollup_seconds": round(t_rollup, 1),
                                      "errors": bucket["error_samples"]}
    top = max(p50s)
    result.add(f"ratio {top:,} / {LEVELS[0]:,} records", p50s[top] / p50s[LEVELS[0]], "x", ("<=", 2))
    result.notes.append(f"{count_usage(user.id):,} records in the end; rollups rebuilt from them as the charge path "
                        "keeps them (DailyRollup)")
    return result
