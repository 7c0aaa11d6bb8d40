"""Call metrics per deployment (each attempt) and per public model (each call), in one-minute buckets.

The hot path only bumps counters in process. Latency and TTFT go into fixed log-scale histograms, so
percentiles over any range are a merge of counters (and merge across processes too). With REDIS_URL set,
the buckets are flushed to Redis by a background thread (HINCRBY, once a second) and reads merge what every
process flushed; without Redis the reads see this process only.
"""

from __future__ import annotations

import bisect
import json
import logging
import threading
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime
from typing import Any

from django.conf import settings

from aiwriter.redis import get_redis
from aiwriter.redis import key as redis_key

logger = logging.getLogger(__name__)

# Upper bounds (ms) of the histogram buckets: 1 ms to ~10 min, each ×1.25.
BOUNDS: list[float] = []
_b = 1.0
while _b < 600_000:
    BOUNDS.append(round(_b, 3))
    _b *= 1.25
COUNTERS = ("requests", "successes", "errors", "prompt_tokens", "completion_tokens", "cache_hits", "cache_misses",
            "latency_sum", "ttft_sum", "ttft_count")
DEPLOYMENT, MODEL, TOTAL = "deployment", "model", "total"
TOTAL_KEY = "calls"
FLUSH_INTERVAL = 1.0

_lock = threading.Lock()
# (scope, key, minute) -> Counter of fields ("requests", ..., "lat:<bucket>", "ttft:<bucket>")
_local: defaultdict[tuple[str, str, int], Counter[str]] = defaultdict(Counter)
_pending: defaultdict[tuple[str, str, int], Counter[str]] = defaultdict(Counter)
_labels: dict[str, dict[str, Any]] = {}
_flusher: threading.Thread | None = None
_last_prune_minute = 0


def _bucket(ms: float) -> int:
    return bisect.bisect_left(BOUNDS, ms)


def _add(scope: str, key: str, fields: dict[str, int]) -> None:
    global _last_prune_minute
    minute = int(time.time() // 60)
    if minute != _last_prune_minute:
        _last_prune_minute = minute
        prune()
    with _lock:
        _local[(scope, key, minute)].update(fields)
        if settings.REDIS_URL:
            _pending[(scope, key, minute)].update(fields)


def _fields(*, ok: bool, latency_ms: int, ttft_ms: int | None, prompt_tokens: int, completion_tokens: int,
            cache_hit: bool | None = None) -> dict[str, int]:
    f = {"requests": 1, "successes" if ok else "errors": 1, "prompt_tokens": prompt_tokens,
         "completion_tokens": completion_tokens, "latency_sum": latency_ms, f"lat:{_bucket(latency_ms)}": 1}
    if ttft_ms is not None:
        f.update({"ttft_sum": ttft_ms, "ttft_count": 1, f"ttft:{_bucket(ttft_ms)}": 1})
    if cache_hit is not None:
        f["cache_hits" if cache_hit else "cache_misses"] = 1
    return f


def record_attempt(*, deployment_id: int, model: str, provider: str, upstream_model: str, ok: bool,
                   latency_ms: int, ttft_ms: int | None = None, prompt_tokens: int = 0,
                   completion_tokens: int = 0) -> None:
    key = str(deployment_id)
    if key not in _labels:
        _labels[key] = {"deployment_id": deployment_id, "model": model, "provider": provider,
                        "upstream_model": upstream_model}
    _add(DEPLOYMENT, key, _fields(ok=ok, latency_ms=latency_ms, ttft_ms=ttft_ms, prompt_tokens=prompt_tokens,
                                  completion_tokens=completion_tokens))
    _maybe_flush()


def record_call(*, model: str, ok: bool, latency_ms: int, ttft_ms: int | None = None, prompt_tokens: int = 0,
                completion_tokens: int = 0, cache_hit: bool | None = None) -> None:
    _add(MODEL, model, _fields(ok=ok, latency_ms=latency_ms, ttft_ms=ttft_ms, prompt_tokens=prompt_tokens,
                               completion_tokens=completion_tokens, cache_hit=cache_hit))
    _maybe_flush()


def record_total(*, ok: bool, latency_ms: int, ttft_ms: int | None = None, prompt_tokens: int = 0,
                 completion_tokens: int = 0, cache_hit: bool | None = None) -> None:
    """One caller's call, whatever models it went through (a fallback is one call here, two per model)."""
    _add(TOTAL, TOTAL_KEY, _fields(ok=ok, latency_ms=latency_ms, ttft_ms=ttft_ms, prompt_tokens=prompt_tokens,
                                   completion_tokens=completion_tokens, cache_hit=cache_hit))
    _maybe_flush()


# --- Redis flush ----------------------------------------------------------------------------

def _take_pending() -> tuple[dict[tuple[str, str, int], Counter[str]], dict[str, dict[str, Any]]]:
    global _pending
    with _lock:
        pending, _pending = _pending, defaultdict(Counter)
        labels = dict(_labels)
    return pending, labels


def _hash_key(scope: str, key: str, minute: int) -> str:
    return redis_key("llmmetrics", scope, key, minute)


def _ttl() -> int:
    return settings.LLM_METRICS_RETENTION_MINUTES * 60 + 120


def _maybe_flush() -> None:
    """With Redis, a daemon thread pushes the counts once a second: nothing on the call path waits for Redis."""
    global _flusher
    if _flusher is None and settings.REDIS_URL:
        with _lock:
            if _flusher is None:
                _flusher = threading.Thread(target=_flush_forever, name="llm-metrics-flush", daemon=True)
                _flusher.start()


def _flush_forever() -> None:
    while True:
        time.sleep(FLUSH_INTERVAL)
        flush_sync()


def _queue(pipe: Any, pending: dict[tuple[str, str, int], Counter[str]], labels: dict[str, dict[str, Any]]) -> None:
    for (scope, key, minute), fields in pending.items():
        name = _hash_key(scope, key, minute)
        for field, value in fields.items():
            if value:
                pipe.hincrby(name, field, int(value))
        pipe.expire(name, _ttl())
        pipe.sadd(redis_key("llmmetrics", "keys"), f"{scope}|{key}")
    if labels:
        pipe.hset(redis_key("llmmetrics", "labels"), mapping={k: json.dumps(v) for k, v in labels.items()})


def _restore(pending: dict[tuple[str, str, int], Counter[str]]) -> None:
    with _lock:
        for k, fields in pending.items():
            _pending[k].update(fields)


def flush_sync() -> None:
    """Pushes this process's pending counts to Redis now (before a read)."""
    client = get_redis()
    if client is None:
        return
    pending, labels = _take_pending()
    if not pending:
        return
    try:
        with client.pipeline(transaction=False) as pipe:
            _queue(pipe, pending, labels)
            pipe.execute()
    except Exception as exc:  # noqa: BLE001
        logger.warning("metrics flush failed: %s", exc.__class__.__name__)
        _restore(pending)


# --- reads ----------------------------------------------------------------------------------

def _minutes(start: datetime | None, end: datetime | None) -> tuple[int, int]:
    now = time.time()
    end_m = int((end.timestamp() if end else now) // 60)
    start_m = int(start.timestamp() // 60) if start else end_m - 59
    return start_m, end_m


def _percentile(hist: Counter[int], q: float) -> int | None:
    total = sum(hist.values())
    if not total:
        return None
    rank, seen = q * total, 0
    for idx in sorted(hist):
        count = hist[idx]
        if seen + count >= rank:
            lo = BOUNDS[idx - 1] if idx > 0 else 0.0
            hi = BOUNDS[idx] if idx < len(BOUNDS) else lo * 1.25
            return int(round(lo + (hi - lo) * ((rank - seen) / count)))  # linear inside the bucket
        seen += count
    return int(BOUNDS[-1])


def _summarize(fields: Counter[str]) -> dict[str, Any]:
    lat = Counter({int(k[4:]): v for k, v in fields.items() if k.startswith("lat:")})
    ttft = Counter({int(k[5:]): v for k, v in fields.items() if k.startswith("ttft:")})
    requests = fields["requests"]
    lookups = fields["cache_hits"] + fields["cache_misses"]
    return {
        "requests": requests, "successes": fields["successes"], "errors": fields["errors"],
        "error_rate": round(fields["errors"] / requests, 4) if requests else 0.0,
        "avg_latency_ms": int(fields["latency_sum"] / requests) if requests else None,
        "p50_latency_ms": _percentile(lat, 0.50), "p95_latency_ms": _percentile(lat, 0.95),
        "p99_latency_ms": _percentile(lat, 0.99),
        "avg_ttft_ms": int(fields["ttft_sum"] / fields["ttft_count"]) if fields["ttft_count"] else None,
        "p50_ttft_ms": _percentile(ttft, 0.50), "p95_ttft_ms": _percentile(ttft, 0.95),
        "prompt_tokens": fields["prompt_tokens"], "completion_tokens": fields["completion_tokens"],
        "total_tokens": fields["prompt_tokens"] + fields["completion_tokens"],
        "cache_hits": fields["cache_hits"], "cache_misses": fields["cache_misses"],
        "cache_hit_rate": round(fields["cache_hits"] / lookups, 4) if lookups else 0.0,
    }


def _collect_local(start_m: int, end_m: int) -> tuple[dict[tuple[str, str], Counter[str]], dict[str, Any]]:
    merged: defaultdict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    with _lock:
        for (scope, key, minute), fields in _local.items():
            if start_m <= minute <= end_m:
                merged[(scope, key)].update(fields)
        labels = dict(_labels)
    return merged, labels


def _collect_redis(client: Any, start_m: int, end_m: int) -> tuple[dict[tuple[str, str], Counter[str]], dict[str, Any]]:
    members = sorted(m.decode() for m in client.smembers(redis_key("llmmetrics", "keys")))
    labels = {k.decode(): json.loads(v) for k, v in client.hgetall(redis_key("llmmetrics", "labels")).items()}
    merged: defaultdict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    minutes = range(start_m, end_m + 1)
    with client.pipeline(transaction=False) as pipe:
        for member in members:
            scope, key = member.split("|", 1)
            for minute in minutes:
                pipe.hgetall(_hash_key(scope, key, minute))
        results = pipe.execute()
    i = 0
    for member in members:
        scope, key = member.split("|", 1)
        for _ in minutes:
            merged[(scope, key)].update({f.decode(): int(v) for f, v in results[i].items()})
            i += 1
    return merged, labels


def snapshot(start: datetime | None = None, end: datetime | None = None) -> dict[str, Any]:
    """Metrics over [start, end] (default: the last hour): per deployment (attempts), per model (a call that
    fell back counts for both models) and in total (callers' calls, each counted once)."""
    start_m, end_m = _minutes(start, end)
    start_m = max(start_m, end_m - settings.LLM_METRICS_RETENTION_MINUTES)
    client = get_redis()
    collected: tuple[dict[tuple[str, str], Counter[str]], dict[str, Any]] | None = None
    if client is not None:
        flush_sync()
        try:
            collected = _collect_redis(client, start_m, end_m)
        except Exception as exc:  # noqa: BLE001 - fall back to what this process saw
            logger.warning("metrics read from Redis failed: %s", exc.__class__.__name__)
    merged, labels = collected if collected is not None else _collect_local(start_m, end_m)
    deployments: list[dict[str, Any]] = []
    models: list[dict[str, Any]] = []
    total: Counter[str] = Counter()
    for (scope, key), fields in sorted(merged.items()):
        if not fields["requests"]:
            continue
        if scope == DEPLOYMENT:
            deployments.append({**labels.get(key, {"deployment_id": int(key)}), **_summarize(fields)})
        elif scope == TOTAL:
            total.update(fields)
        else:
            models.append({"model": key, **_summarize(fields)})
    return {
        "start": datetime.fromtimestamp(start_m * 60, UTC).isoformat(),
        "end": datetime.fromtimestamp((end_m + 1) * 60, UTC).isoformat(),
        "summary": _summarize(total), "deployments": deployments, "models": models,
    }


def prune() -> None:
    """Drops in-process buckets older than the retention (called now and then from record paths)."""
    oldest = int(time.time() // 60) - settings.LLM_METRICS_RETENTION_MINUTES
    with _lock:
        for k in [k for k in _local if k[2] < oldest]:
            del _local[k]


def reset() -> None:
    with _lock:
        _local.clear()
        _pending.clear()
        _labels.clear()
