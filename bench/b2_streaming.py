"""2. Streaming overhead: time to first token and gaps between chunks, via /v1 SSE and /ws/chat/ vs direct.

The upstream paces its chunks (bench.setup.STREAM_KNOBS), so a chunk the gateway holds back shows up
as a longer gap or as fewer, merged chunks.
"""

from __future__ import annotations

from bench.harness import BenchResult, percentile
from bench.setup import STREAM, STREAM_KNOBS, WS_AGENT, Context

# Issue 13's goal here: "websocket chat turn: added TTFT <= 10 ms sequential". SSE TTFT, the gaps and the
# chunk ratio are informative (a held-back chunk shows in them); `errors == 0` guards the figures.
WS_ADDED_TTFT_GOAL_MS = 10


def run(ctx: Context) -> BenchResult:
    result = BenchResult("2", "Streaming overhead (TTFT and inter-chunk, SSE and websocket vs direct)")
    n = 20 if ctx.quick else 100
    pace_ms = STREAM_KNOBS["chunk_delay"] * 1000
    result.notes.append(f"upstream sends {STREAM_KNOBS['tokens']} chunks {pace_ms:.0f} ms apart")
    sse = ctx.load({"op": "sse", "n": n, "max_seconds": ctx.allowance(45) * 0.6,
                    "targets": [ctx.direct(STREAM, stream=True), ctx.gateway(STREAM, stream=True)]})
    direct, gw = sse["targets"]
    d_ttft, g_ttft = percentile(direct["ttft"], 50), percentile(gw["ttft"], 50)
    result.add("SSE: added TTFT p50", g_ttft - d_ttft, "ms", note=f"direct {d_ttft:.2f} / via {g_ttft:.2f}")
    result.add("SSE: added TTFT p99", percentile(gw["ttft"], 99) - percentile(direct["ttft"], 99), "ms")
    _gaps(result, "SSE", direct, gw)
    result.add("SSE: errors", gw["errors"] + direct["errors"], "", ("==", 0))
    result.details["sse"] = {"direct_errors": direct["error_samples"], "gateway_errors": gw["error_samples"]}

    try:
        ws = ctx.load({"op": "ws_seq", "url": ctx.ws_url(), "origin": ctx.origin(), "agent": WS_AGENT, "n": n,
                       "max_seconds": ctx.allowance(30), "timeout": 30,
                       "headers": {"Authorization": f"Bearer {ctx.users['main'].key}"}})
    except RuntimeError as exc:
        result.notes.append(f"websocket part did not run: {str(exc)[-300:]}")
        return result
    if ws["ttft"]:
        w_ttft = percentile(ws["ttft"], 50)
        result.add("websocket chat turn (sequential): added TTFT p50", w_ttft - d_ttft, "ms",
                   ("<=", WS_ADDED_TTFT_GOAL_MS),
                   note=f"direct SSE {d_ttft:.2f} / via ws {w_ttft:.2f} (ws includes conversation + message writes)")
        _gaps(result, "websocket", direct, ws)
    result.add("websocket: errors", ws["errors"], "", ("==", 0))
    result.details["ws"] = {"errors": ws["error_samples"]}
    return result


def _gaps(result: BenchResult, label: str, direct: dict, via: dict) -> None:
    if not via["gaps"] or not direct["gaps"]:
        return
    d50, d99 = percentile(direct["gaps"], 50), percentile(direct["gaps"], 99)
    result.add(f"{label}: inter-chunk p50 added", percentile(via["gaps"], 50) - d50, "ms",
               note=f"direct p50 {d50:.2f}, p99 {d99:.2f} / via p99 {percentile(via['gaps'], 99):.2f}")
    chunks = percentile(via["chunks"], 50) / percentile(direct["chunks"], 50)
    result.add(f"{label}: chunks delivered / chunks sent (median)", chunks, "",
               note="< 1 means chunks were merged (held back)")
