"""Shared plumbing for the benchmarks: statistics, figures with goals, processes, /proc readings.

Nothing here imports Django: the orchestrator (bench/run.py) sets the environment first.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- statistics ----------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def summary(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50": percentile(values, 50), "p90": percentile(values, 90),
            "p99": percentile(values, 99), "max": max(values) if values else math.nan}


# --- figures -------------------------------------------------------------------------------------
@dataclass
class Figure:
    """One reported number. `goal` is (op, bound) with op in "<=", ">=", "==", or None (informative)."""

    name: str
    value: float | None
    unit: str = ""
    goal: tuple[str, float] | None = None
    note: str = ""

    @property
    def ok(self) -> bool | None:
        if self.goal is None or self.value is None or (isinstance(self.value, float) and math.isnan(self.value)):
            return None
        op, bound = self.goal
        return {"<=": self.value <= bound, ">=": self.value >= bound, "==": self.value == bound,
                ">": self.value > bound, "<": self.value < bound}[op]

    def goal_text(self) -> str:
        return f"{self.goal[0]} {fmt(self.goal[1])} {self.unit}".strip() if self.goal else ""

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ok"] = self.ok
        data["goal"] = self.goal_text() or None
        return data


def fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, int) or float(value).is_integer() and abs(value) >= 10:
        return f"{int(value):,}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


@dataclass
class BenchResult:
    key: str
    title: str
    figures: list[Figure] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str = ""
    seconds: float = 0.0

    def add(self, name: str, value: float | None, unit: str = "", goal: tuple[str, float] | None = None,
            note: str = "") -> Figure:
        figure = Figure(name, value, unit, goal, note)
        self.figures.append(figure)
        return figure

    def print(self) -> None:
        print(f"\n== {self.key}. {self.title}  ({self.seconds:.0f} s)", flush=True)
        for f in self.figures:
            mark = {True: "ok  ", False: "MISS", None: "    "}[f.ok]
            goal = f"goal {f.goal_text()}" if f.goal else ""
            print(f"  {mark} {f.name:<58} {fmt(f.value):>10} {f.unit:<6} {goal:<18} {f.note}", flush=True)
        for note in self.notes:
            print(f"       note: {note}", flush=True)
        if self.error:
            print(f"  ERROR {self.error}", flush=True)

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "title": self.title, "seconds": round(self.seconds, 1), "error": self.error,
                "notes": self.notes, "figures": [f.as_dict() for f in self.figures], "details": self.details}


# --- processes -----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout:.0f} s")


def pin(pid: int, cpus: set[int] | None) -> bool:
    """Pins a process to CPUs; False where the machine or platform does not allow it."""
    if not cpus or not hasattr(os, "sched_setaffinity"):
        return False
    try:
        os.sched_setaffinity(pid, cpus)
        return True
    except OSError:
        return False


class Proc:
    """A child process started by the bench, stopped by its own pid (never by name)."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path, cpus: set[int] | None = None):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(args, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        self.pinned = pin(self.popen.pid, cpus)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._log.close()

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (its threads included), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return math.nan


def machine() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    mem_gib = math.nan
    try:
        with open("/proc/meminfo") as f:
            mem_gib = int(next(line for line in f if line.startswith("MemTotal")).split()[1]) / 1024 / 1024
    except (OSError, StopIteration):
        pass
    return {"nproc": os.cpu_count(), "cpu_model": model, "memory_gib": round(mem_gib, 1),
            "python": sys.version.split()[0], "load_avg_at_start": os.getloadavg()}


# --- the load generator, in its own process ------------------------------------------------------
def run_load(spec: dict[str, Any], env: dict[str, str], cpus: set[int] | None, timeout: float) -> dict[str, Any]:
    """Runs bench/loadgen.py on `spec` (JSON in, JSON out), pinned to `cpus` where allowed."""
    proc = subprocess.Popen([PY, "-m", "bench.loadgen"], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    pin(proc.pid, cpus)
    try:
        out, err = proc.communicate(json.dumps(spec).encode(), timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise RuntimeError(f"load generator timed out after {timeout:.0f} s: {err.decode()[-500:]}") from None
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed ({proc.returncode}): {err.decode()[-2000:]}")
    return json.loads(out)
