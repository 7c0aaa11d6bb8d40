"""A /v1 stream leaves the ASGI app chunk by chunk: nothing in the middleware chain buffers or compresses it.

Drives Django's real ASGI handler (with the project's whole MIDDLEWARE) in this process, so it runs in the
bare run too; over real sockets and daphne see test_openai_sdk.py::test_stream_chunks_are_not_buffered.
Ordering, not wall-clock speed: the headers and the first text must be sent while the upstream is still
streaming (its completion counter is still 0), which a buffering middleware (GZip, a body-reading
wrapper) could not do.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from django.core.asgi import get_asgi_application

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("close_thread_connections")]


async def run_stream(auth: str, fake_upstream) -> list[dict]:
    """POSTs a streaming completion; returns the ASGI messages sent, each with the upstream's completion
    count at the moment it was sent."""
    body = json.dumps({"model": "fake-gpt", "messages": [{"role": "user", "content": "Hi"}], "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"", "root_path": "",
        "headers": [(b"host", b"testserver"), (b"content-type", b"application/json"),
                    (b"accept-encoding", b"gzip, deflate, br"),  # as the openai SDK sends it
                    (b"authorization", auth.encode()), (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 50000), "server": ("testserver", 80),
    }
    sent: list[dict] = []
    received = False
    finished = asyncio.Event()

    async def receive() -> dict:
        nonlocal received
        if not received:
            received = True
            return {"type": "http.request", "body": body, "more_body": False}
        await finished.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append({**message, "upstream_done": fake_upstream.served["fake-gpt"]})
        if message["type"] == "http.response.body" and not message.get("more_body"):
            finished.set()

    await asyncio.wait_for(get_asgi_application()(scope, receive, send), 60)
    return sent


async def test_headers_and_first_text_leave_while_the_upstream_still_streams(openai_account, fake_gpt,
                                                                             fake_upstream):
    fake_upstream.configure("fake-gpt", tokens=8, chunk_delay=0.3)
    sent = await run_stream(openai_account.auth, fake_upstream)

    start = sent[0]
    assert start["type"] == "http.response.start" and start["status"] == 200
    headers = {name.decode().lower(): value.decode() for name, value in start["headers"]}
    assert headers["content-type"] == "text/event-stream"
    assert "content-encoding" not in headers and "content-length" not in headers  # not gzipped, not collected
    assert start["upstream_done"] == 0
    # Who serves the stream is settled with its first text, so it goes out with these early headers.
    deployment = await fake_gpt.deployments.select_related("provider").afirst()
    assert (headers["x-aiwriter-provider"], headers["x-aiwriter-fallback"], headers["x-aiwriter-cache"]) == (
        deployment.provider.name, "false", "miss")
    assert headers["x-aiwriter-cost"] == "pending"

    bodies = [m for m in sent if m["type"] == "http.response.body" and m.get("body")]
    with_text = [m for m in bodies if b'"content":"' in m["body"] and b'"content":""' not in m["body"]]
    assert with_text[0]["upstream_done"] == 0  # the first token went out before the upstream finished
    assert len(with_text) == 8  # one body message per upstream token: nothing was joined on the way
    text = b"".join(m["body"] for m in bodies).decode()
    assert text.endswith("data: [DONE]\n\n") and '"usage":{"prompt_tokens"' in text
