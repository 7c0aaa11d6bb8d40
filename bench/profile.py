"""Where the server's time goes: py-spy samples daphne while a closed loop of /v1 calls runs.

    python -m bench.run --only none --profile          (collapsed stacks in var/bench/profile.txt)
    BENCH_PROFILE_WS=1 python -m bench.run --only none --profile     (websocket chat turns instead)
    BENCH_PROFILE_B3=1 python -m bench.run --only 3                  (both servers during each level of bench 3)

Prints the functions with the most samples (own and cumulative), so a fix can target what dominates.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
from collections import Counter
from pathlib import Path

from bench.setup import Context

_OURS = ("aiwriter/", "agents/", "usage/", "conversations/")


def _py_spy(ctx: Context) -> str | None:
    spy = shutil.which("py-spy") or str(Path(ctx.env.get("VIRTUAL_ENV", ".venv")) / "bin" / "py-spy")
    return spy if Path(spy).exists() else None


class Recording:
    """py-spy on several processes at once, from now until finish() (bounded by `max_seconds`)."""

    def __init__(self, ctx: Context, pids: list[int], name: str, max_seconds: float = 600):
        self.outputs = [ctx.log_dir / f"{name}_{i}.txt" for i in range(len(pids))]
        self.procs: list[subprocess.Popen] = []
        spy = _py_spy(ctx)
        if spy is None:
            return
        for pid, out in zip(pids, self.outputs, strict=True):
            out.unlink(missing_ok=True)
            cmd = [spy, "record", "-p", str(pid), "-d", str(int(max_seconds)), "-r", "100", "-f", "raw",
                   "-o", str(out), "--nonblocking"]
            self.procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                               start_new_session=True))

    def finish(self) -> list[str]:
        """Stops the recorders (py-spy writes its file on SIGINT); one summary line per process."""
        if not self.procs:
            return ["py-spy is not installed: no profile"]
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        lines = []
        for proc, out in zip(self.procs, self.outputs, strict=True):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            if not out.exists():
                lines.append(f"py-spy produced no profile ({out.name})")
                continue
            shares = ", ".join(f"{name} {share:.0f} %" for name, share in categorize(out)[:8])
            lines.append(f"{out.name}: {shares}")
        return lines


def profile(ctx: Context, seconds: float = 8.0, stream: bool = False, concurrency: int = 8) -> str:
    spy = _py_spy(ctx)
    if spy is None:
        return "py-spy is not installed (pip install py-spy): no profile"
    out = ctx.log_dir / "profile.txt"
    cmd = [spy, "record", "-p", str(ctx.server_pid()), "-d", str(int(seconds)), "-r", "200", "-f", "raw",
           "-o", str(out), "--nonblocking", "--gil"]
    if os.environ.get("BENCH_PROFILE_WS") == "1":  # sequential websocket chat turns instead of /v1 calls
        from bench.setup import WS_AGENT

        spec = {"op": "ws_seq", "url": ctx.ws_url(), "origin": ctx.origin(), "agent": WS_AGENT, "n": 100000,
                "timeout": 30, "headers": {"Authorization": f"Bearer {ctx.users['main'].key}"}}
        ctx.load({**spec, "max_seconds": 5})
        load = {**spec, "max_seconds": seconds + 1}
    else:
        # Warm up first: the first calls import the openai SDK and build clients, which is not the steady state.
        ctx.load({"op": "closed", "target": ctx.gateway(stream=stream), "concurrency": 8, "count": 300})
        load = {"op": "closed", "target": ctx.gateway(stream=stream), "concurrency": concurrency,
                "duration": seconds + 1}
    runner = threading.Thread(target=lambda: subprocess.run(cmd, capture_output=True, timeout=seconds + 30))
    runner.start()
    ctx.load(load)
    runner.join(seconds + 40)
    if not out.exists():
        return "py-spy produced no profile (ptrace not permitted?)"
    return summarize(out)


# Innermost matching frame decides a sample's category (first match in this order, from the leaf up).
_CATEGORIES = [
    ("openai SDK + httpx", ("openai/", "httpx", "httpcore", "anyio/", "h11/")),
    ("psycopg", ("psycopg",)),
    ("Django ORM", ("django/db/",)),
    ("asgiref / thread hops", ("asgiref/", "concurrent/futures", "threading.py", "queue.py")),
    ("daphne / twisted / autobahn", ("daphne/", "twisted/", "autobahn/")),
    ("channels", ("channels/", "channels_redis/")),
    ("redis", ("redis/",)),
    ("prometheus", ("prometheus_client/",)),
    ("DRF", ("rest_framework/",)),
    ("Django (other)", ("django/",)),
    ("asyncio", ("asyncio/", "selectors.py")),
]


def categorize(path: Path) -> list[tuple[str, float]]:
    counts: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        total += int(count)
        label = "other"
        for frame in reversed(stack.split(";")):
            hit = next((name for name, marks in _CATEGORIES if any(m in frame for m in marks)), None)
            if hit is None and any(p in frame for p in _OURS):
                hit = "aiwriter code"
            if hit:
                label = hit
                break
        counts[label] += int(count)
    return [(name, n / total * 100) for name, n in counts.most_common()] if total else []


def summarize(path: Path, top: int = 25) -> str:
    own: Counter[str] = Counter()
    cumulative: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for frame in set(frames):
            cumulative[frame] += n
    lines = [f"{total} samples"]
    lines.append("-- cumulative (project code)")
    for frame, n in [(f, n) for f, n in cumulative.most_common() if any(p in f for p in _OURS)][:top]:
        lines.append(f"{n / total * 100:5.1f}%  {frame}")
    lines.append("-- by where the innermost frame is")
    for name, share in categorize(path):
        lines.append(f"{share:5.1f}%  {name}")
    lines.append("-- own time")
    for frame, n in own.most_common(top):
        lines.append(f"{n / total * 100:5.1f}%  {frame}")
    return "\n".join(lines)
