"""3. Many websocket chats streaming at once, spread over two daphne processes.

Issue 13's goal: "1,000 concurrent chats over two processes: 100 % complete, TTFT p50 <= 2 s, inter-chunk p99
<= 100 ms". The goals apply at 1,000 chats; smaller levels print the same figures without goals.

Each level also says where the CPU went (from /proc and the load generator's rusage): the two servers share
CPU 0, the fake upstream and the load generator CPU 1, so a side near 100 % of its core is what limits.
`BENCH_WS_LEVELS=500,1000` picks the levels; `BENCH_PROFILE_B3=1` py-spies both servers during each level
(collapsed stacks in var/bench/profile_b3_<chats>_<server>.txt, a summary in the notes);
`BENCH_B3_SPREAD=1` gives each server a core of its own (server 1 then shares CPU 1 with the client side).
A few chats first warm both servers up (imports, SDK clients, caches), so the first level measures steady state.
"""

from __future__ import annotations

import os
import resource
import threading
import time
from dataclasses import dataclass

from bench.harness import BenchResult, cpu_seconds, percentile, pin, rss_mib
from bench.profile import Recording
from bench.setup import CLIENT_CPUS, STREAM_KNOBS, WS_AGENT, Context, start_server

GOAL_CHATS = 1000
COMPLETION_GOAL_PERCENT = 100
TTFT_P50_GOAL_MS = 2000
INTER_CHUNK_P99_GOAL_MS = 100
WARMUP_CHATS = 20


class _PeakRss:
    """Samples the servers' RSS in a thread while the load runs; keeps the peak of the sum."""

    def __init__(self, pids: list[int]):
        self.pids = pids
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        for _ in range(10_000):  # bounded: 0.1 s apart, ~17 minutes at most
            self.peak = max(self.peak, sum(rss_mib(pid) for pid in self.pids))
            if self._stop.wait(0.1):
                return

    def __enter__(self) -> _PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)


def _children_cpu() -> float:
    """CPU seconds of the orchestrator's finished children: the load generator, once it has been waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _services_cpu() -> float:
    """CPU seconds of every PostgreSQL and Redis server process on the machine (their work for the chats, and
    anything else they serve meanwhile: on a quiet machine, the chats)."""
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm") as f:
                name = f.read().strip()
            if name in ("postgres", "redis-server") or name.startswith("postgres:"):
                total += cpu_seconds(int(entry))
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
    return total


@dataclass
class _CpuMeter:
    """CPU seconds each side used during one level, and the level's wall time."""

    servers: list[int]
    upstream: int | None
    server_cores: int = 1

    def __post_init__(self) -> None:
        self._start = self._read()

    def _read(self) -> tuple[float, float, float, float, float]:
        upstream = cpu_seconds(self.upstream) if self.upstream else 0.0
        return (time.monotonic(), sum(cpu_seconds(pid) for pid in self.servers), upstream, _children_cpu(),
                _services_cpu())

    def note(self) -> tuple[str, dict[str, float]]:
        end = self._read()
        wall, servers, upstream, loadgen, services = (b - a for a, b in zip(self._start, end, strict=True))
        figures = {"wall_s": wall, "servers_cpu_s": servers, "upstream_cpu_s": upstream, "loadgen_cpu_s": loadgen,
                   "postgres_redis_cpu_s": services}
        cores = "their one core" if self.server_cores == 1 else f"{self.server_cores} cores"
        text = (f"CPU over the level's {wall:.0f} s: both servers {servers:.1f} s "
                f"({servers / wall / self.server_cores * 100:.0f} % of {cores}), fake upstream {upstream:.1f} s + "
                f"load generator {loadgen:.1f} s ({(upstream + loadgen) / wall * 100:.0f} % of one core), "
                f"PostgreSQL + Redis {services:.1f} s")
        return text, figures


def _analyze() -> None:
    """Planner statistics, as a database in use has them (autovacuum keeps them). The bench's database was created
    seconds ago: without this, PostgreSQL plans the turn's queries for empty tables while thousands of rows arrive,
    e.g. the per-user running check scanned every running reply of every user (520,000 index scans at 1,000 chats,
    twice PostgreSQL's CPU) until autovacuum caught up mid-level."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")


def _levels(ctx: Context) -> list[int]:
    chosen = os.environ.get("BENCH_WS_LEVELS", "")
    if chosen:
        return [int(n) for n in chosen.split(",") if n.strip()]
    return [20, 50] if ctx.quick else [100, 500, 1000]


def _upstream_pid(ctx: Context) -> int | None:
    return next((proc.pid for proc in ctx.procs if proc.name == "fake_upstream"), None)


def run(ctx: Context) -> BenchResult:
    result = BenchResult("3", "Concurrent websocket chats across two daphne processes")
    while len(ctx.servers) < 2:
        start_server(ctx)
    pids = [ctx.server_pid(0), ctx.server_pid(1)]
    spread = os.environ.get("BENCH_B3_SPREAD") == "1" and ctx.pinned
    if spread:
        pin(pids[1], CLIENT_CPUS)
        result.notes.append("server 1 pinned to CPU 1, with the load generator and the fake upstream")
    profiling = os.environ.get("BENCH_PROFILE_B3") == "1"
    ran = []
    ctx.load(_spec(ctx, WARMUP_CHATS), timeout=120)
    _analyze()
    for n in _levels(ctx):
        # Rough cost of a level on this machine (open + chats + settle); skip what would not fit.
        needed = 15 + n * 0.12
        if ctx.remaining() - ctx.later < needed:
            result.notes.append(f"{n} chats skipped: {ctx.remaining():.0f} s left, ~{needed:.0f} s needed")
            continue
        time.sleep(1)
        baseline = sum(rss_mib(pid) for pid in pids)
        spec = _spec(ctx, n)
        spy = Recording(ctx, pids, name=f"profile_b3_{n}") if profiling else None
        cpu = _CpuMeter(pids, _upstream_pid(ctx), server_cores=2 if spread else 1)
        with _PeakRss(pids) as peak:
            out = ctx.load(spec, timeout=120 + n * 0.3)
        cpu_note, cpu_figures = cpu.note()
        ran.append(n)
        _report(result, n, out, peak.peak - baseline, peak.peak, baseline)
        result.notes.append(f"{n} chats: {cpu_note}")
        if spy is not None:
            result.notes.extend(f"{n} chats, server {i}: {line}" for i, line in enumerate(spy.finish()))
        result.details[str(n)] = {**{k: out[k] for k in ("opened", "completed", "failed", "connect_failed",
                                                          "open_seconds", "chat_seconds", "error_samples")},
                                  **{k: round(v, 2) for k, v in cpu_figures.items()}}
    result.details["levels_run"] = ran
    return result


def _spec(ctx: Context, n: int) -> dict:
    return {"op": "ws_many", "n": n, "agent": WS_AGENT, "urls": [ctx.ws_url(0), ctx.ws_url(1)],
            "origins": [ctx.origin(0), ctx.origin(1)],
            "headers": [{"Authorization": f"Bearer {user.key}"} for user in ctx.chatters],
            "timeout": 30 + n * 0.1, "open_timeout": 30 + n * 0.05, "hold_seconds": 1.0}


def _report(result: BenchResult, n: int, out: dict, growth_mib: float, peak_mib: float, baseline_mib: float) -> None:
    goal = n == GOAL_CHATS
    rate = out["completed"] / n * 100
    result.add(f"{n} chats: completion rate", rate, "%", ("==", COMPLETION_GOAL_PERCENT) if goal else None,
               note=f"opened {out['opened']}, failed {out['failed']} (connect {out['connect_failed']})")
    if out["ttft"]:
        result.add(f"{n} chats: TTFT p50", percentile(out["ttft"], 50), "ms",
                   ("<=", TTFT_P50_GOAL_MS) if goal else None,
                   note=f"p90 {percentile(out['ttft'], 90):.0f}, max {max(out['ttft']):.0f} (send → first delta)")
    if out["gaps"]:
        gaps = out["gaps"]  # between delta frames at the client: a merged frame's pieces count once
        result.add(f"{n} chats: inter-chunk p99", percentile(gaps, 99), "ms",
                   ("<=", INTER_CHUNK_P99_GOAL_MS) if goal else None,
                   note=f"p50 {percentile(gaps, 50):.1f}, p90 {percentile(gaps, 90):.1f}, max {max(gaps):.0f}")
    if out.get("chunks"):
        result.add(f"{n} chats: delta frames per chat (median)", percentile(out["chunks"], 50), "",
                   note=f"the upstream sends {STREAM_KNOBS['tokens']} chunks per reply; fewer frames = merged text")
    result.add(f"{n} chats: server memory per chat", growth_mib * 1024 / n, "KiB",
               note=f"peak RSS of both processes {peak_mib:.0f} MiB (baseline {baseline_mib:.0f})")

