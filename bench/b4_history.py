"""4. The hot path does not grow with history: /v1 latency and DB queries, 1k vs many usage records."""

from __future__ import annotations

from bench.data import insert_usage
from bench.harness import BenchResult, percentile
from bench.setup import Context


def run(ctx: Context) -> BenchResult:
    result = BenchResult("4", "Hot-path cost with 1k vs a long usage history")
    small, big = 1_000, (100_000 if ctx.quick else ctx.args.history_rows)
    t_small = insert_usage(user_id=ctx.users["small"].id, rows=small)
    t_big = insert_usage(user_id=ctx.users["big"].id, rows=big)
    result.notes.append(f"inserted {small:,} rows in {t_small:.1f} s and {big:,} rows in {t_big:.1f} s")
    n = 100 if ctx.quick else 400
    out = ctx.load({"op": "seq", "n": n, "warmup": 20, "max_seconds": ctx.allowance(40),
                    "targets": [ctx.gateway(user="small"), ctx.gateway(user="big")]})
    a, b = out["targets"]
    p50a, p50b = percentile(a["lat"], 50), percentile(b["lat"], 50)
    result.add(f"latency p50 ratio {big:,} / {small:,} records", p50b / p50a, "x", ("<=", 1.1),
               note=f"{p50a:.2f} ms vs {p50b:.2f} ms")
    result.add(f"latency p99 ratio {big:,} / {small:,} records",
               percentile(b["lat"], 99) / percentile(a["lat"], 99), "x")
    if a["db_queries"] and b["db_queries"]:
        # Median: the occasional extra write (the key's last_used_at, once a minute) is not history.
        qa, qb = percentile(a["db_queries"], 50), percentile(b["db_queries"], 50)
        result.add(f"DB queries per request, {small:,} records (median)", qa, "",
                   note=f"max {max(a['db_queries'])}")
        result.add(f"DB queries per request, {big:,} records (median)", qb, "", ("<=", qa),
                   note=f"max {max(b['db_queries'])}; DB time p50 {percentile(a['db_ms'], 50):.2f} vs "
                   f"{percentile(b['db_ms'], 50):.2f} ms")
    result.add("errors", a["errors"] + b["errors"], "", ("==", 0))
    result.details["errors"] = a["error_samples"] + b["error_samples"]
    return result
