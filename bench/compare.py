"""Before/after in one run: the deployed settings against another settings module, side by side.

    python -m bench.run --only none --compare bench.settings_with_sync_whitenoise

Both servers run at once (pinned alike); sequential requests alternate between them and the
upstream, closed loops alternate A, B, A, B, so machine noise hits both sides alike.
"""

from __future__ import annotations

import time

from bench.harness import BenchResult, cpu_seconds, percentile
from bench.setup import Context, start_server


def compare(ctx: Context, settings_module: str) -> BenchResult:
    started = time.monotonic()
    result = BenchResult("compare", f"{ctx.args.settings} (A) vs {settings_module} (B)")
    start_server(ctx, settings_module=settings_module)
    b = len(ctx.servers) - 1
    n = 100 if ctx.quick else 300
    seq = ctx.load({"op": "seq", "n": n, "warmup": 30,
                    "targets": [ctx.direct(), ctx.gateway(server=0), ctx.gateway(server=b)]})
    direct, ga, gb = seq["targets"]
    for label, bucket in (("A", ga), ("B", gb)):
        for q in (50, 99):
            result.add(f"{label}: sequential added p{q}", percentile(bucket["lat"], q) - percentile(direct["lat"], q),
                       "ms")
    seconds = 3 if ctx.quick else 6
    totals = {"A": [0, 0.0, 0.0], "B": [0, 0.0, 0.0]}  # completed, elapsed, server cpu
    for _ in range(2):
        for label, server in (("A", 0), ("B", b)):
            pid = ctx.server_pid(server)
            before = cpu_seconds(pid)
            out = ctx.load({"op": "closed", "target": ctx.gateway(server=server), "concurrency": 32,
                            "duration": seconds, "warmup": 10})
            totals[label][0] += out["completed"]
            totals[label][1] += out["elapsed"]
            totals[label][2] += cpu_seconds(pid) - before
    # The other settings' server is not one of the run's servers: later benchmarks must not use it.
    _, proc = ctx.servers.pop(b)
    proc.stop()
    ctx.procs.remove(proc)
    for label, (done, elapsed, cpu) in totals.items():
        result.add(f"{label}: closed loop c=32 throughput", done / elapsed if elapsed else 0, "req/s")
        result.add(f"{label}: server CPU per request", cpu / done * 1000 if done else float("nan"), "ms")
    result.seconds = time.monotonic() - started
    return result
