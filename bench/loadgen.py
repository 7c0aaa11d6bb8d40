"""The load generator: reads one JSON spec on stdin, runs it, writes one JSON result on stdout.

It runs in its own process (bench/harness.run_load pins it away from the server). Every loop is
bounded by a count and by time. Ops:

    seq     targets alternated request by request (c=1): latency, errors, DB queries (Server-Timing)
    open    open loop at a fixed rate for a fixed time; latency counted from the intended send time
    closed  closed loop at concurrency c for a time or a count: throughput
    sse     streamed requests alternated across targets: time to first token, gaps between chunks
    ws_seq  websocket chats one after another: time to first delta, gaps between deltas
    ws_many n websocket chats at once across several servers: completion, gaps, delta frames per chat
    replay  a fixed sequence of (target, body) requests: latency per label, cache header
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
import uuid
from typing import Any

import aiohttp
import websockets

_DB = re.compile(r'db;dur=([\d.]+);desc="(\d+) queries"')


def _db(headers: Any) -> tuple[float, int] | None:
    match = _DB.search(headers.get("Server-Timing", ""))
    return (float(match.group(1)), int(match.group(2))) if match else None


def _bucket() -> dict[str, Any]:
    return {"lat": [], "errors": 0, "error_samples": [], "db_ms": [], "db_queries": [], "cache": {}}


def _error(bucket: dict[str, Any], what: str) -> None:
    bucket["errors"] += 1
    if len(bucket["error_samples"]) < 5:
        bucket["error_samples"].append(what[:300])


async def _post(session: aiohttp.ClientSession, target: dict[str, Any], bucket: dict[str, Any],
                started: float | None = None, body: dict[str, Any] | None = None) -> None:
    started = time.perf_counter() if started is None else started
    try:
        method = target.get("method", "POST")
        payload = body or target.get("body") if method == "POST" else None
        async with session.request(method, target["url"], json=payload, headers=target.get("headers")) as r:
            data = await r.read()
            elapsed = (time.perf_counter() - started) * 1000
            if r.status != 200:
                _error(bucket, f"{r.status} {data[:200]!r}")
                return
            bucket["lat"].append(elapsed)
            db = _db(r.headers)
            if db:
                bucket["db_ms"].append(db[0])
                bucket["db_queries"].append(db[1])
            cache = r.headers.get("x-aiwriter-cache")
            if cache:
                bucket["cache"][cache] = bucket["cache"].get(cache, 0) + 1
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        _error(bucket, repr(exc))


def _session(limit: int = 100, timeout: float = 30) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit, force_close=False),
                                 timeout=aiohttp.ClientTimeout(total=timeout))


async def op_seq(spec: dict[str, Any]) -> dict[str, Any]:
    targets = spec["targets"]
    buckets = [_bucket() for _ in targets]
    deadline = time.monotonic() + spec.get("max_seconds", 120)
    async with _session(limit=len(targets) + 1) as session:
        for _ in range(spec.get("warmup", 20)):
            for target in targets:
                await _post(session, target, _bucket())
        for _ in range(spec["n"]):
            if time.monotonic() > deadline:
                break
            for target, bucket in zip(targets, buckets, strict=True):
                await _post(session, target, bucket)
    return {"targets": buckets}


async def op_open(spec: dict[str, Any]) -> dict[str, Any]:
    target, rate, duration = spec["target"], spec["rate"], spec["duration"]
    bucket = _bucket()
    interval = 1 / rate
    total = int(rate * duration)
    tasks = []
    late = 0
    async with _session(limit=spec.get("max_connections", 256)) as session:
        for _ in range(min(spec.get("warmup", 20), total)):
            await _post(session, target, _bucket())
        start = time.perf_counter()
        for i in range(total):
            due = start + i * interval
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -0.005:
                late += 1  # the generator itself fell behind: reported, latency still counted from `due`
            tasks.append(asyncio.create_task(_post(session, target, bucket, started=due)))
        _, pending = await asyncio.wait(tasks, timeout=spec.get("drain_seconds", 30))
        for task in pending:  # a server that cannot keep up: what is still unanswered counts as failed
            task.cancel()
            _error(bucket, "no answer before the drain deadline")
        elapsed = time.perf_counter() - start
    return {"bucket": bucket, "sent": total, "late_sends": late, "elapsed": elapsed, "unanswered": len(pending)}


async def op_closed(spec: dict[str, Any]) -> dict[str, Any]:
    target, concurrency = spec["target"], spec["concurrency"]
    duration, count = spec.get("duration"), spec.get("count")
    max_seconds = spec.get("max_seconds", 300)
    bucket = _bucket()
    issued = 0
    async with _session(limit=concurrency) as session:
        for _ in range(spec.get("warmup", 0)):
            await _post(session, target, _bucket())
        start = time.perf_counter()
        stop_at = start + (duration if duration else max_seconds)

        async def worker() -> None:
            nonlocal issued
            while time.perf_counter() < stop_at and (count is None or issued < count):
                issued += 1
                await _post(session, target, bucket)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    done = len(bucket["lat"])
    return {"bucket": bucket, "completed": done, "elapsed": elapsed, "rps": done / elapsed if elapsed else 0}


async def _sse(session: aiohttp.ClientSession, target: dict[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    arrivals: list[float] = []
    async with session.post(target["url"], json=target["body"], headers=target.get("headers")) as r:
        if r.status != 200:
            raise RuntimeError(f"{r.status} {(await r.read())[:200]!r}")
        async for line in r.content:
            if not line.startswith(b"data: "):
                continue
            payload = line[6:].strip()
            if payload == b"[DONE]":
                break
            event = json.loads(payload)
            choices = event.get("choices") or []
            if choices and (choices[0].get("delta") or {}).get("content"):
                arrivals.append(time.perf_counter())
    if not arrivals:
        raise RuntimeError("stream carried no content")
    return {"ttft": (arrivals[0] - started) * 1000,
            "gaps": [(b - a) * 1000 for a, b in zip(arrivals, arrivals[1:], strict=False)],
            "chunks": len(arrivals)}


async def op_sse(spec: dict[str, Any]) -> dict[str, Any]:
    targets = spec["targets"]
    out = [{"ttft": [], "gaps": [], "chunks": [], "errors": 0, "error_samples": []} for _ in targets]
    deadline = time.monotonic() + spec.get("max_seconds", 120)
    async with _session(limit=4) as session:
        for i in range(spec.get("warmup", 5) + spec["n"]):
            if time.monotonic() > deadline:
                break
            for target, bucket in zip(targets, out, strict=True):
                try:
                    result = await _sse(session, target)
                except (TimeoutError, aiohttp.ClientError, OSError, RuntimeError, ValueError) as exc:
                    _error(bucket, repr(exc))
                    continue
                if i >= spec.get("warmup", 5):
                    bucket["ttft"].append(result["ttft"])
                    bucket["gaps"].extend(result["gaps"])
                    bucket["chunks"].append(result["chunks"])
    return {"targets": out}


def _ws_message(spec: dict[str, Any], n: int) -> str:
    return json.dumps({"type": "message", "conversation": None, "agent": spec["agent"],
                       "content": f"{spec.get('content', 'Say something.')} #{n} {uuid.uuid4().hex[:6]}",
                       "client_id": str(uuid.uuid4()),
                       # a project per chat: each message starts its own conversation (no create-dedupe)
                       "project": f"bench-{n}-{uuid.uuid4().hex[:8]}"})


async def _ws_chat(ws: Any, spec: dict[str, Any], n: int, timeout: float) -> dict[str, Any]:
    """Sends one message and reads frames until `done`; the time base is the send."""
    started = time.perf_counter()
    await ws.send(_ws_message(spec, n))
    arrivals: list[float] = []
    deadline = started + timeout
    while True:
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            raise TimeoutError("no done frame in time")
        frame = json.loads(await asyncio.wait_for(ws.recv(), remaining))
        kind = frame.get("type")
        if kind == "delta":
            arrivals.append(time.perf_counter())
        elif kind == "done":
            break
        elif kind == "error":
            raise RuntimeError(f"error frame: {json.dumps(frame)[:200]}")
    if not arrivals:
        raise RuntimeError("done without any delta")
    return {"ttft": (arrivals[0] - started) * 1000,
            "gaps": [(b - a) * 1000 for a, b in zip(arrivals, arrivals[1:], strict=False)],
            "chunks": len(arrivals), "total": (time.perf_counter() - started) * 1000}


def _ws_connect(url: str, headers: dict[str, str], origin: str) -> Any:
    return websockets.connect(url, additional_headers=headers, origin=origin, open_timeout=30,
                              max_queue=None, ping_interval=None, compression=None)


async def op_ws_seq(spec: dict[str, Any]) -> dict[str, Any]:
    out = {"ttft": [], "gaps": [], "chunks": [], "errors": 0, "error_samples": []}
    deadline = time.monotonic() + spec.get("max_seconds", 120)
    async with _ws_connect(spec["url"], spec["headers"], spec["origin"]) as ws:
        for i in range(spec.get("warmup", 3) + spec["n"]):
            if time.monotonic() > deadline:
                break
            try:
                result = await _ws_chat(ws, spec, i, spec.get("timeout", 30))
            except (TimeoutError, RuntimeError, websockets.WebSocketException, ValueError) as exc:
                _error(out, repr(exc))
                continue
            if i >= spec.get("warmup", 3):
                out["ttft"].append(result["ttft"])
                out["gaps"].extend(result["gaps"])
                out["chunks"].append(result["chunks"])
    return out


async def op_ws_many(spec: dict[str, Any]) -> dict[str, Any]:
    """n chats at once: all sockets open first (held at a barrier), then every chat sends at once."""
    n, urls = spec["n"], spec["urls"]
    out = {"ttft": [], "gaps": [], "chunks": [], "completed": 0, "failed": 0, "errors": 0, "error_samples": [],
           "connect_failed": 0}
    opened = 0
    all_open = asyncio.Event()
    go = asyncio.Event()
    connect_sem = asyncio.Semaphore(spec.get("connect_concurrency", 50))

    async def chat(i: int) -> None:
        nonlocal opened
        url = urls[i % len(urls)]
        try:
            async with connect_sem:
                ws = await _ws_connect(url, spec["headers"][i % len(spec["headers"])], spec["origins"][i % len(urls)])
        except (TimeoutError, OSError, websockets.WebSocketException) as exc:
            out["connect_failed"] += 1
            out["failed"] += 1
            _error(out, f"connect: {exc!r}")
            opened += 1
            if opened == n:
                all_open.set()
            return
        try:
            opened += 1
            if opened == n:
                all_open.set()
            await go.wait()
            result = await _ws_chat(ws, spec, i, spec.get("timeout", 60))
            out["ttft"].append(result["ttft"])
            out["gaps"].extend(result["gaps"])
            out["chunks"].append(result["chunks"])
            out["completed"] += 1
        except (TimeoutError, RuntimeError, websockets.WebSocketException, ValueError, OSError) as exc:
            out["failed"] += 1
            _error(out, repr(exc))
        finally:
            await ws.close()

    tasks = [asyncio.create_task(chat(i)) for i in range(n)]
    start = time.perf_counter()
    try:
        await asyncio.wait_for(all_open.wait(), spec.get("open_timeout", 60))
    except TimeoutError:
        pass
    out["open_seconds"] = time.perf_counter() - start
    out["opened"] = opened
    # Tell the orchestrator the sockets are open (it samples server memory now), then wait for its go.
    print(json.dumps({"event": "open", "opened": opened}), file=sys.stderr, flush=True)
    await asyncio.sleep(spec.get("hold_seconds", 1.0))
    go.set()
    chat_start = time.perf_counter()
    await asyncio.wait(tasks, timeout=spec.get("timeout", 60) + 10)
    out["chat_seconds"] = time.perf_counter() - chat_start
    return out


async def op_replay(spec: dict[str, Any]) -> dict[str, Any]:
    targets = spec["targets"]
    labels: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + spec.get("max_seconds", 120)
    async with _session(limit=len(targets) + 1) as session:
        for target_index, body, label in spec["items"]:
            if time.monotonic() > deadline:
                break
            bucket = labels.setdefault(label, _bucket())
            await _post(session, targets[target_index], bucket, body=body)
    return {"labels": labels}


OPS = {"seq": op_seq, "open": op_open, "closed": op_closed, "sse": op_sse, "ws_seq": op_ws_seq,
       "ws_many": op_ws_many, "replay": op_replay}


def main() -> None:
    spec = json.load(sys.stdin)
    result = asyncio.run(OPS[spec["op"]](spec))
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
