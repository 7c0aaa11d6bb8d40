"""3. Many websocket chats streaming at once, spread over two daphne processes."""

from __future__ import annotations

import threading
import time

from bench.harness import BenchResult, percentile, rss_mib
from bench.setup import WS_AGENT, Context, start_server


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


def run(ctx: Context) -> BenchResult:
    result = BenchResult("3", "Concurrent websocket chats across two daphne processes")
    while len(ctx.servers) < 2:
        start_server(ctx)
    levels = [20, 50] if ctx.quick else [100, 500, 1000]
    pids = [ctx.server_pid(0), ctx.server_pid(1)]
    ran = []
    for n in levels:
        # Rough cost of a level on this machine (open + chats + settle); skip what would not fit.
        needed = 15 + n * 0.12
        if ctx.remaining() - ctx.later < needed:
            result.notes.append(f"{n} chats skipped: {ctx.remaining():.0f} s left, ~{needed:.0f} s needed")
            continue
        time.sleep(1)
        baseline = sum(rss_mib(pid) for pid in pids)
        spec = {"op": "ws_many", "n": n, "agent": WS_AGENT, "urls": [ctx.ws_url(0), ctx.ws_url(1)],
                "origins": [ctx.origin(0), ctx.origin(1)],
                "headers": [{"Authorization": f"Bearer {ctx.users['main'].key}"}],
                "timeout": 30 + n * 0.1, "open_timeout": 30 + n * 0.05, "hold_seconds": 1.0}
        with _PeakRss(pids) as peak:
            out = ctx.load(spec, timeout=120 + n * 0.3)
        ran.append(n)
        rate = out["completed"] / n * 100
        result.add(f"{n} chats: completion rate", rate, "%", ("==", 100),
                   note=f"opened {out['opened']}, failed {out['failed']} (connect {out['connect_failed']})")
        if out["gaps"]:
            result.add(f"{n} chats: inter-chunk p99", percentile(out["gaps"], 99), "ms", ("<=", 50),
                       note=f"p50 {percentile(out['gaps'], 50):.1f}, TTFT p50 {percentile(out['ttft'], 50):.0f} ms")
        result.add(f"{n} chats: server memory per chat", (peak.peak - baseline) * 1024 / n, "KiB",
                   note=f"peak RSS of both processes {peak.peak:.0f} MiB (baseline {baseline:.0f})")
        result.details[str(n)] = {k: out[k] for k in ("opened", "completed", "failed", "connect_failed",
                                                       "open_seconds", "chat_seconds", "error_samples")}
    result.details["levels_run"] = ran
    return result

