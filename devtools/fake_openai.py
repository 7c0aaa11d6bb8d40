"""A real OpenAI-compatible HTTP server for tests and benchmarks (no SDK patching anywhere).

Endpoints:
    POST /v1/chat/completions   stream and non-stream; SSE `data: {chat.completion.chunk}` lines then
                                `data: [DONE]`; with `stream_options.include_usage` a last chunk with
                                empty `choices` carries `usage`. Non-stream returns a `chat.completion`.
    GET  /v1/models             the configured model names (plus any seen in requests).
    POST /_control/configure    {"model": name, ...knobs}  (same knobs as `configure()` below)
    POST /_control/reset        forget knobs, recorded requests and counters
    GET  /_control/requests     {"requests": [...], "served": {model: n}}

The reply is deterministic and echoes what the server received:
    "Echo. System: <system prompt> | User: <last user message>"
then, when `tokens` is set, cut or padded (with " the") to exactly that many o200k tokens. Each
token is one SSE chunk. `max_tokens` in the request cuts the reply (finish_reason "length").
Usage counts real o200k tokens with OpenAI's per-message framing (3 per message + 3 priming).

Knobs, per upstream model name (`configure(model, **knobs)` or the control endpoint); a request
may also override them with a `"fake": {...}` object in its body (openai SDK: `extra_body`):
    latency        seconds before the first token (stream) or before the response (non-stream)
    chunk_delay    seconds between chunks
    tokens         number of completion tokens (None = the echo text as is)
    reply          fixed reply text instead of the echo
    status         HTTP status to return instead of 200 (500, 429, 400, ...), JSON error body
    fail_times     the failure knobs (status, hang, cut_after, malformed) apply to the first N requests
                   of this model only, then it answers normally (None = always)
    retry_after    Retry-After header value (seconds) sent with an error status
    cut_after      stream: send N content chunks, then drop the connection (no finish, no [DONE])
    hang           accept the request and never answer (until the client gives up)
    omit_usage     never report usage (stream or not)
    malformed      stream: send a broken `data:` line after the first chunk
    cached_tokens  report usage.prompt_tokens_details.cached_tokens = N
    finish_reason  report this finish_reason ("content_filter", …) instead of "stop"/"length"
Function calling: a request with `tools` (and `tool_choice` not "none") is answered with one tool call instead
of text: the function named by `tool_choice`, else the first tool, with arguments
    {"echo": "<last user message>"}
(`id` "call_fake<n>", finish_reason "tool_calls"; streamed as a first piece with id and name, then the
arguments one token per chunk). Its completion tokens are the arguments' o200k tokens. A request whose last
message is a `tool` result gets the echo text again, as "Echo. Tool: <result>".
Every request is recorded (`.requests`: model, body, stream, authorization, time) and each
completion served in full is counted (`.served[model]`, `.completions`).

Standalone: `python -m devtools.fake_openai --port 9100` (benchmarks).
In tests: the `fake_upstream` fixture (tests/fixtures_llm.py) runs it in a background thread.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import itertools
import json
import threading
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import bpe_openai
from aiohttp import web

_ENCODING = bpe_openai.get_encoding("o200k_base")
_PAD_TOKEN = _ENCODING.encode_ordinary(" the")[0]
_ids = itertools.count(1)


@dataclass
class Knobs:
    latency: float = 0.0
    chunk_delay: float = 0.0
    tokens: int | None = None
    reply: str | None = None
    status: int = 200
    fail_times: int | None = None
    retry_after: float | None = None
    cut_after: int | None = None
    hang: bool = False
    omit_usage: bool = False
    malformed: bool = False
    cached_tokens: int | None = None
    finish_reason: str | None = None


_KNOB_NAMES = {f.name for f in fields(Knobs)}


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content)


def prompt_tokens(messages: list[dict[str, Any]]) -> int:
    """OpenAI's chat framing: 3 tokens per message, 3 to prime the reply."""
    total = 3
    for m in messages:
        total += 3 + len(_ENCODING.encode_ordinary(m.get("role", ""))) + len(
            _ENCODING.encode_ordinary(_text(m.get("content"))))
        if m.get("name"):
            total += 1 + len(_ENCODING.encode_ordinary(m["name"]))
    return total


def echo_text(messages: list[dict[str, Any]]) -> str:
    if messages and messages[-1].get("role") == "tool":
        return f"Echo. Tool: {_text(messages[-1].get('content'))}"
    system = next((_text(m.get("content")) for m in messages if m.get("role") == "system"), "")
    user = next((_text(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "")
    return f"Echo. System: {system} | User: {user}"


def reply_tokens(knobs: Knobs, messages: list[dict[str, Any]], max_tokens: int | None) -> tuple[list[int], str]:
    ids = _ENCODING.encode_ordinary(knobs.reply if knobs.reply is not None else echo_text(messages))
    if knobs.tokens is not None:
        ids = ids[: knobs.tokens] + [_PAD_TOKEN] * max(0, knobs.tokens - len(ids))
    if max_tokens is not None and len(ids) > max_tokens:
        return ids[:max_tokens], "length"
    return ids, "stop"


def tool_call_for(body: dict[str, Any]) -> dict[str, Any] | None:
    """The call the fake makes when offered tools: tool_choice's function, else the first tool's."""
    tools = body.get("tools") or []
    choice = body.get("tool_choice")
    if not tools or choice == "none" or (body.get("messages") or [{}])[-1].get("role") == "tool":
        return None
    name = (choice.get("function") or {}).get("name") if isinstance(choice, dict) else None
    name = name or (tools[0].get("function") or {}).get("name", "")
    user = next((_text(m.get("content")) for m in reversed(body.get("messages") or []) if m.get("role") == "user"), "")
    return {"id": f"call_fake{next(_ids)}", "type": "function",
            "function": {"name": name, "arguments": json.dumps({"echo": user})}}


def token_pieces(ids: list[int]) -> list[str]:
    """One piece per token; bytes of a multi-token character are held until it is complete."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pieces = []
    for token in ids:
        piece = decoder.decode(_ENCODING.decode_single_token_bytes(token))
        if piece:
            pieces.append(piece)
    tail = decoder.decode(b"", final=True)
    if tail:
        pieces.append(tail)
    return pieces


class FakeOpenAI:
    """The server state plus its aiohttp app. Thread-safe enough for tests (GIL, simple writes)."""

    def __init__(self) -> None:
        self.knobs: dict[str, Knobs] = {}
        self.requests: list[dict[str, Any]] = []
        self.served: Counter[str] = Counter()
        self._seen: defaultdict[str, int] = defaultdict(int)
        self.app = web.Application()
        self.app.add_routes([
            web.post("/v1/chat/completions", self.chat_completions),
            web.get("/v1/models", self.models),
            web.post("/_control/configure", self.control_configure),
            web.post("/_control/reset", self.control_reset),
            web.get("/_control/requests", self.control_requests),
        ])
        self._runner: web.AppRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None
        self.host = "127.0.0.1"

    # --- Python API ----------------------------------------------------------------------
    def configure(self, model: str, **knobs: Any) -> None:
        unknown = set(knobs) - _KNOB_NAMES
        if unknown:
            raise TypeError(f"unknown knobs: {sorted(unknown)}")
        self.knobs[model] = replace(self.knobs.get(model, Knobs()), **knobs)

    def reset(self) -> None:
        self.knobs.clear()
        self.requests.clear()
        self.served.clear()
        self._seen.clear()

    @property
    def completions(self) -> int:
        return sum(self.served.values())

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def requests_for(self, model: str) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["model"] == model]

    # --- handlers --------------------------------------------------------------------------
    async def models(self, request: web.Request) -> web.Response:
        names = sorted(set(self.knobs) | set(self._seen))
        return web.json_response({"object": "list", "data": [
            {"id": n, "object": "model", "created": 0, "owned_by": "fake"} for n in names]})

    async def control_configure(self, request: web.Request) -> web.Response:
        body = await request.json()
        model = body.pop("model")
        try:
            self.configure(model, **body)
        except TypeError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"ok": True, "knobs": asdict(self.knobs[model])})

    async def control_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"ok": True})

    async def control_requests(self, request: web.Request) -> web.Response:
        return web.json_response({"requests": self.requests, "served": dict(self.served)})

    def _error(self, status: int, knobs: Knobs) -> web.Response:
        headers = {"Retry-After": str(knobs.retry_after)} if knobs.retry_after is not None else {}
        kind = {400: "invalid_request_error", 401: "authentication_error", 429: "rate_limit_error"}.get(
            status, "server_error")
        return web.json_response(
            {"error": {"message": f"fake upstream returned {status}", "type": kind, "code": str(status)}},
            status=status, headers=headers)

    def _usage(self, prompt: int, completion: int, knobs: Knobs) -> dict[str, Any]:
        usage: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                                 "total_tokens": prompt + completion}
        if knobs.cached_tokens is not None:
            usage["prompt_tokens_details"] = {"cached_tokens": knobs.cached_tokens}
        return usage

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return web.json_response({"error": {"message": "invalid JSON", "type": "invalid_request_error"}},
                                     status=400)
        model = str(body.get("model", ""))
        knobs = self.knobs.get(model, Knobs())
        override = body.get("fake")
        if isinstance(override, dict):
            knobs = replace(knobs, **{k: v for k, v in override.items() if k in _KNOB_NAMES})
        self._seen[model] += 1
        nth = self._seen[model]
        stream = bool(body.get("stream"))
        self.requests.append({"model": model, "body": body, "stream": stream, "time": time.time(),
                              "authorization": request.headers.get("Authorization", "")})

        if knobs.fail_times is not None and nth > knobs.fail_times:
            knobs = replace(knobs, status=200, hang=False, cut_after=None, malformed=False)
        if knobs.hang:
            await asyncio.sleep(3600)  # cancelled when the client disconnects (handler_cancellation)
        if knobs.status != 200:
            if knobs.latency:
                await asyncio.sleep(knobs.latency)
            return self._error(knobs.status, knobs)

        messages = body.get("messages") or []
        ids, finish = reply_tokens(knobs, messages, body.get("max_tokens") or body.get("max_completion_tokens"))
        finish = knobs.finish_reason or finish
        prompt = prompt_tokens(messages)
        cid = f"chatcmpl-fake{next(_ids)}"
        created = int(time.time())
        call = tool_call_for(body)
        if call is not None:
            return await self._tool_call(request, body, knobs, model, cid, created, call, prompt, stream)
        if not stream:
            if knobs.latency:
                await asyncio.sleep(knobs.latency)
            payload: dict[str, Any] = {
                "id": cid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": _ENCODING.decode(ids)},
                             "finish_reason": finish, "logprobs": None}],
            }
            if not knobs.omit_usage:
                payload["usage"] = self._usage(prompt, len(ids), knobs)
            self.served[model] += 1
            return web.json_response(payload)
        return await self._stream(request, body, knobs, model, cid, created, ids, finish, prompt)

    async def _stream(self, request: web.Request, body: dict[str, Any], knobs: Knobs, model: str, cid: str,
                      created: int, ids: list[int], finish: str, prompt: int) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)

        def chunk(delta: dict[str, Any], finish_reason: str | None = None, **extra: Any) -> bytes:
            data = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}], **extra}
            return f"data: {json.dumps(data)}\n\n".encode()

        if knobs.latency:
            await asyncio.sleep(knobs.latency)
        await response.write(chunk({"role": "assistant", "content": ""}))
        for n, piece in enumerate(token_pieces(ids)):
            if knobs.cut_after is not None and n >= knobs.cut_after:
                if request.transport is not None:
                    request.transport.abort()  # drop the connection mid-body: no finish, no [DONE]
                return response
            if n and knobs.chunk_delay:
                await asyncio.sleep(knobs.chunk_delay)
            await response.write(chunk({"content": piece}))
            if n == 0 and knobs.malformed:
                await response.write(b"data: {\"id\": \"broken\", \"choices\": [\n\n")
        if knobs.cut_after is not None and knobs.cut_after >= len(ids) and request.transport is not None:
            request.transport.abort()
            return response
        await response.write(chunk({}, finish))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        if include_usage and not knobs.omit_usage:
            data = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [], "usage": self._usage(prompt, len(ids), knobs)}
            await response.write(f"data: {json.dumps(data)}\n\n".encode())
        self.served[model] += 1  # counted before [DONE] so a client that has read it sees the count
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def _tool_call(self, request: web.Request, body: dict[str, Any], knobs: Knobs, model: str, cid: str,
                         created: int, call: dict[str, Any], prompt: int, stream: bool) -> web.StreamResponse:
        ids = _ENCODING.encode_ordinary(call["function"]["arguments"])
        usage = self._usage(prompt, len(ids), knobs)
        if knobs.latency:
            await asyncio.sleep(knobs.latency)
        if not stream:
            payload: dict[str, Any] = {
                "id": cid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": None, "tool_calls": [call]},
                             "finish_reason": "tool_calls", "logprobs": None}],
            }
            if not knobs.omit_usage:
                payload["usage"] = usage
            self.served[model] += 1
            return web.json_response(payload)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)

        async def send(delta: dict[str, Any], finish_reason: str | None = None) -> None:
            data = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
            await response.write(f"data: {json.dumps(data)}\n\n".encode())

        await send({"role": "assistant", "content": None})
        await send({"tool_calls": [{"index": 0, "id": call["id"], "type": "function",
                                    "function": {"name": call["function"]["name"], "arguments": ""}}]})
        for piece in token_pieces(ids):
            if knobs.chunk_delay:
                await asyncio.sleep(knobs.chunk_delay)
            await send({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
        await send({}, "tool_calls")
        if (body.get("stream_options") or {}).get("include_usage") and not knobs.omit_usage:
            data = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [], "usage": usage}
            await response.write(f"data: {json.dumps(data)}\n\n".encode())
        self.served[model] += 1
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    # --- running -------------------------------------------------------------------------
    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self._runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # port 0 = the OS picks a free one

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def start_in_thread(self, host: str = "127.0.0.1", port: int = 0) -> FakeOpenAI:
        """Runs the server on its own event loop in a daemon thread; returns once it listens."""
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self.start(host, port))
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="fake-openai", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fake upstream did not start")
        return self

    def stop_thread(self) -> None:
        if self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self.stop(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(5)
        self._loop = None


def main() -> None:
    parser = argparse.ArgumentParser(description="OpenAI-compatible fake upstream for tests and benchmarks.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    server = FakeOpenAI()

    async def serve() -> None:
        await server.start(args.host, args.port)
        print(f"fake openai listening on {server.base_url}", flush=True)
        await asyncio.Event().wait()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
