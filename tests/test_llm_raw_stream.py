"""The OpenAI-compatible adapter reads the upstream's SSE as plain dicts (agents/llm/providers.py): what an upstream
may send that the fake upstream does not — an error event mid-stream, odd shapes, CRLF lines, null fields — and
that a finished stream leaves its connection open for the next call."""

from __future__ import annotations

import json

import pytest
from aiohttp import web

from agents.llm.providers import OpenAICompatibleProvider
from agents.llm.types import ChatRequest, LLMError, TextDelta, Usage

REQUEST = ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}])


def _event(data: object, end: bytes = b"\n") -> bytes:
    return b"data: " + (data if isinstance(data, bytes) else json.dumps(data).encode()) + end + end


def _chunk(delta: dict, finish_reason: str | None = None) -> dict:
    return {"id": "c", "object": "chat.completion.chunk", "choices": [
        {"index": 0, "delta": delta, "finish_reason": finish_reason}]}


@pytest.fixture
async def upstream():
    """serve(body_bytes) -> an adapter whose upstream answers every call with that SSE body; .peers: client ports."""
    state: dict = {"body": b"", "peers": []}

    async def completions(request: web.Request) -> web.StreamResponse:
        await request.read()
        assert request.transport is not None
        state["peers"].append(request.transport.get_extra_info("peername")[1])
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(state["body"])
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", completions)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    adapter = OpenAICompatibleProvider(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-test")

    def serve(body: bytes) -> OpenAICompatibleProvider:
        state["body"] = body
        return adapter

    serve.peers = state["peers"]
    yield serve
    await adapter.client.close()
    await runner.cleanup()


async def _collect(adapter: OpenAICompatibleProvider) -> list[TextDelta | Usage]:
    return [item async for item in adapter.stream(REQUEST, "m")]


async def test_deltas_tool_calls_and_usage_with_crlf_and_null_fields(upstream):
    body = (_event(_chunk({"role": "assistant", "content": "Hel"}), b"\r\n")
            + _event(_chunk({"content": "lo", "tool_calls": None}), b"\r\n")
            + _event(_chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                             "function": {"name": "f", "arguments": None}}]}), b"\r\n")
            + _event(_chunk({"tool_calls": [{"index": 0, "id": None, "function": {"arguments": "{}"}}]}), b"\r\n")
            + _event(_chunk({}, "tool_calls"), b"\r\n")
            + _event({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3,
                                               "prompt_tokens_details": None}}, b"\r\n")
            + _event(b"[DONE]", b"\r\n"))
    items = await _collect(upstream(body))
    assert items == [
        TextDelta("Hel"), TextDelta("lo"),
        TextDelta("", tool_calls=[{"index": 0, "id": "call_1", "type": "function", "function": {"name": "f"}}]),
        TextDelta("", tool_calls=[{"index": 0, "function": {"arguments": "{}"}}]),
        TextDelta("", finish_reason="tool_calls"),
        Usage(prompt_tokens=5, completion_tokens=3),
    ]


async def test_an_error_event_mid_stream_is_an_upstream_error_after_the_text_before_it(upstream):
    adapter = upstream(_event(_chunk({"content": "partial"})) + _event({"error": {"message": "overloaded"}}))
    seen = []
    with pytest.raises(LLMError) as caught:
        async for item in adapter.stream(REQUEST, "m"):
            seen.append(item)
    assert seen == [TextDelta("partial")]
    assert caught.value.code == "upstream_error" and "overloaded" in str(caught.value)


@pytest.mark.parametrize("data", [b"[1, 2]", b"{broken", json.dumps({"choices": {"0": {}}}).encode(),
                                  json.dumps({"choices": [{"delta": "text"}]}).encode(),
                                  json.dumps({"choices": [], "usage": ["x"]}).encode()])
async def test_a_malformed_chunk_is_a_bad_response_not_a_crash(upstream, data):
    with pytest.raises(LLMError) as caught:
        await _collect(upstream(_event(data) + _event(b"[DONE]")))
    assert caught.value.code == "upstream_bad_response"


async def test_a_finished_stream_leaves_its_connection_for_the_next_call(upstream):
    adapter = upstream(_event(_chunk({"content": "ok"}, "stop")) + _event(b"[DONE]"))
    for _ in range(3):
        assert (await _collect(adapter))[0] == TextDelta("ok", finish_reason="stop")
    assert len(set(upstream.peers)) == 1
