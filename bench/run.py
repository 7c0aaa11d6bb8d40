"""Runs the benchmarks (`make bench`): `python -m bench.run [--quick] [--only 1,2] [--max-rows N]`.

Creates a throw-away PostgreSQL database (aiw_bench_run), uses Redis under its own key prefix, starts
the fake upstream (zero latency) and daphne as subprocesses, seeds users, keys and models, runs each
benchmark with the load generator in its own process, prints every figure with its goal, and writes
bench/results.json. BENCH_QUICK=1 (or --quick) runs a few-seconds smoke version of each.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

from bench.harness import ROOT, BenchResult, fmt, machine

# The least time each benchmark needs, kept free for it while earlier ones scale down.
MIN_SECONDS = {"1": 110, "2": 25, "3": 30, "4": 60, "5": 50, "6": 35, "7": 40}
BENCHMARKS = {
    "1": "bench.b1_overhead",
    "2": "bench.b2_streaming",
    "3": "bench.b3_websockets",
    "4": "bench.b4_history",
    "5": "bench.b5_stats",
    "6": "bench.b6_cache",
    "7": "bench.b7_memory",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", default=os.environ.get("BENCH_QUICK") == "1",
                        help="smoke run: a few seconds per benchmark (also BENCH_QUICK=1)")
    parser.add_argument("--only", default=os.environ.get("BENCH_ONLY", ""), help="comma-separated benchmark numbers")
    parser.add_argument("--max-rows", type=int, default=int(os.environ.get("BENCH_MAX_ROWS", "1000000")),
                        help="cap on usage rows generated for benchmark 5 (10M in full takes minutes to insert)")
    parser.add_argument("--history-rows", type=int, default=int(os.environ.get("BENCH_HISTORY_ROWS", "1000000")),
                        help="usage rows of the 'long history' user in benchmark 4")
    parser.add_argument("--mem-requests", type=int, default=int(os.environ.get("BENCH_MEM_REQUESTS", "20000")),
                        help="requests before the second RSS reading of benchmark 7")
    parser.add_argument("--budget", type=float, default=float(os.environ.get("BENCH_BUDGET_SECONDS", "570")),
                        help="seconds the whole run may take; later benchmarks scale down to fit")
    parser.add_argument("--pg-url", default=os.environ.get("BENCH_PG_URL", "postgres://postgres@127.0.0.1:5432"),
                        help="PostgreSQL server (no database name); the bench creates its own database")
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/6"))
    parser.add_argument("--no-db-pool", dest="db_pool", action="store_false",
                        help="persistent connections (DB_CONN_MAX_AGE) instead of the psycopg pool")
    parser.add_argument("--settings", default="aiwriter.settings",
                        help="DJANGO_SETTINGS_MODULE for the servers (experiments: bench/settings_*.py)")
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    parser.add_argument("--compare", metavar="SETTINGS", default="",
                        help="before/after: also serve with this settings module and compare (bench/compare.py)")
    parser.add_argument("--profile", action="store_true", help="py-spy the server under /v1 load (bench/profile.py)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results.json"))
    parser.add_argument("--doc", action="store_true",
                        help="also write the measured table into docs/BENCHMARKS.md (between its markers)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    selected = [k for k in BENCHMARKS if not args.only or k in args.only.split(",")]

    from bench import setup

    env = setup.bench_env(args)
    # The orchestrator itself uses Django (seeding, bulk inserts) against the bench database.
    for name in ("DJANGO_SETTINGS_MODULE", "SECRET_KEY", "DEBUG", "DATABASE_URL", "REDIS_URL", "REDIS_KEY_PREFIX",
                 "ALLOWED_HOSTS", "SECURE_COOKIES", "LOG_LEVEL", "DB_POOL", "DB_CONN_MAX_AGE",
                 "MAX_CONCURRENT_CONVERSATIONS"):
        if name in env:
            os.environ[name] = env[name]
    os.environ["DB_POOL"] = "0"  # the orchestrator uses a plain connection; only the servers pool
    log_dir = ROOT / "var" / "bench"
    log_dir.mkdir(parents=True, exist_ok=True)
    ctx = setup.Context(args=args, quick=args.quick, deadline=started + args.budget, env=env, log_dir=log_dir)
    results: list[BenchResult] = []
    info = {"started_at": datetime.now(UTC).isoformat(timespec="seconds"), "quick": args.quick,
            "machine": machine(), "db_pool": args.db_pool, "max_rows": args.max_rows,
            "history_rows": args.history_rows, "mem_requests": args.mem_requests}
    print(f"aiwriter bench ({'quick' if args.quick else 'full'}): {info['machine']}", flush=True)
    try:
        setup.create_database(args.pg_url)
        setup.clear_redis(args.redis_url)
        setup.migrate(env, log_dir)
        import django

        django.setup()
        setup.start_upstream(ctx)
        setup.seed(ctx)
        setup.start_server(ctx)
        info["pinned"] = ctx.pinned
        info["setup_seconds"] = round(time.monotonic() - started, 1)
        print(f"setup done in {info['setup_seconds']} s; server pinned to CPU 0, load generator and upstream "
              f"to CPU 1: {ctx.pinned}", flush=True)
        if args.profile:
            from bench.profile import profile

            print(profile(ctx, concurrency=int(os.environ.get("BENCH_PROFILE_CONCURRENCY", "8"))), flush=True)
        if args.compare:
            from bench.compare import compare

            result = compare(ctx, args.compare)
            results.append(result)
            result.print()
        for i, key in enumerate(selected):
            ctx.later = 0 if args.quick else sum(MIN_SECONDS[k] for k in selected[i + 1:])
            result = _run_one(key, ctx)
            results.append(result)
            result.print()
    finally:
        ctx.stop()
        from django.db import connections

        connections.close_all()
        if not args.keep:
            try:
                setup.drop_database(args.pg_url)
            except Exception as exc:  # noqa: BLE001 - cleanup must not hide the results
                print(f"could not drop {setup.DB_NAME}: {exc}", file=sys.stderr)
            setup.clear_redis(args.redis_url)
    info["total_seconds"] = round(time.monotonic() - started, 1)
    Path(args.out).write_text(json.dumps({"run": info, "benchmarks": [r.as_dict() for r in results]}, indent=2,
                                         default=str))
    _print_table(results, info)
    if args.doc:
        write_doc(markdown(results, info))
    return 0 if all(not r.error for r in results) else 1


def _run_one(key: str, ctx) -> BenchResult:
    t0 = time.monotonic()
    try:
        module = importlib.import_module(BENCHMARKS[key])
        result = module.run(ctx)
    except Exception as exc:  # noqa: BLE001 - one failing benchmark must not stop the others
        result = BenchResult(key, BENCHMARKS[key], error=f"{exc.__class__.__name__}: {exc}")
        result.details["traceback"] = traceback.format_exc()[-3000:]
    result.seconds = time.monotonic() - t0
    return result


def _print_table(results: list[BenchResult], info: dict) -> None:
    print(f"\n== summary ({info['total_seconds']} s, {'quick' if info['quick'] else 'full'} run)")
    misses = [(r.key, f) for r in results for f in r.figures if f.ok is False]
    for key, f in misses:
        print(f"  MISS {key}. {f.name}: {fmt(f.value)} {f.unit} (goal {f.goal_text()})")
    errors = [r for r in results if r.error]
    for r in errors:
        print(f"  ERROR {r.key}. {r.error}")
    if not misses and not errors:
        print("  every figure with a goal met it")


DOC = ROOT / "docs" / "BENCHMARKS.md"
START, END = "<!-- bench:table:start -->", "<!-- bench:table:end -->"


def markdown(results: list[BenchResult], info: dict) -> str:
    m = info["machine"]
    lines = [f"Run {info['started_at']} ({'quick' if info['quick'] else 'full'}, {info['total_seconds']} s): "
             f"{m['nproc']} CPUs ({m['cpu_model']}), {m['memory_gib']} GiB, Python {m['python']}, "
             f"load average at start {m['load_avg_at_start'][0]:.1f}; server pinned apart from the load generator: "
             f"{info.get('pinned')}; DB pool: {info['db_pool']}.", "",
             "| # | figure | measured | goal | |", "|---|---|---:|---|---|"]
    for r in results:
        if r.error:
            lines.append(f"| {r.key} | {r.title}: did not run | | | {r.error[:120]} |")
        for f in r.figures:
            mark = {True: "ok", False: "**miss**", None: ""}[f.ok]
            note = f.note.replace("|", "/")
            lines.append(f"| {r.key} | {f.name} | {fmt(f.value)} {f.unit} | {f.goal_text()} | {mark} {note} |")
        for note in r.notes:
            lines.append(f"| {r.key} | _{note}_ | | | |")
    return "\n".join(lines)


def write_doc(table: str) -> None:
    text = DOC.read_text() if DOC.exists() else f"# Benchmarks\n\n{START}\n{END}\n"
    if START not in text or END not in text:
        text += f"\n{START}\n{END}\n"
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(f"{head}{START}\n{table}\n{END}{tail}")


if __name__ == "__main__":
    sys.exit(main())
