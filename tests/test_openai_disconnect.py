"""A client that hangs up mid-stream, driven through Django's real ASGI handler in this process.

The handler cancels the response when the server reports `http.disconnect`; the call must then be
recorded as partial and billed for the text generated so far, before the handler returns (no waiting
for garbage collection). Runs in the bare run too; over real sockets see test_openai_sdk.py.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from django.core.asgi import get_asgi_application

from devtools.fake_openai import prompt_tokens
from usage.models import LedgerEntry, UsageRecord

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("close_thread_connections")]

MESSAGES = [{"role": "user", "content": "Tell me a long story"}]


async def stream_then_hang_up(auth: str, *, after_chunks: int, slow_send: float = 0.0) -> list[bytes]:
    """POSTs a streaming completion to the ASGI app and disconnects after `after_chunks` body chunks."""
    body = json.dumps({"model": "fake-gpt", "messages": MESSAGES, "stream": True}).encode()
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"", "root_path": "",
        "headers": [(b"host", b"testserver"), (b"content-type", b"application/json"),
                    (b"authorization", auth.encode()), (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 50000), "server": ("testserver", 80),
    }
    hung_up = asyncio.Event()
    request_sent = False
    chunks: list[bytes] = []

    async def receive() -> dict:
        nonlocal request_sent
        if not request_sent:
            request_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await hung_up.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            chunks.append(message["body"])
            if len(chunks) >= after_chunks:
                hung_up.set()
                if slow_send:
                    await asyncio.sleep(slow_send)  # the disconnect lands while a chunk is being sent

    await asyncio.wait_for(get_asgi_application()(scope, receive, send), 15)
    return chunks


@pytest.mark.parametrize("where", ["waiting_for_upstream", "sending_a_chunk"])
async def test_hang_up_records_a_partial_call_charged_for_what_was_generated(openai_account, fake_gpt,
                                                                             fake_upstream, where):
    if where == "waiting_for_upstream":
        fake_upstream.configure("fake-gpt", tokens=300, chunk_delay=0.02)
        chunks = await stream_then_hang_up(openai_account.auth, after_chunks=6)
    else:
        fake_upstream.configure("fake-gpt", tokens=300, chunk_delay=0.002)
        chunks = await stream_then_hang_up(openai_account.auth, after_chunks=6, slow_send=0.3)
    assert 6 <= len(chunks) < 100 and b"[DONE]" not in b"".join(chunks)
    # Written before the handler returned: no polling needed.
    record = await UsageRecord.objects.aget(api_key=openai_account.key)
    assert (record.status, record.token_source, record.error_code) == ("cancelled", "partial", "client_closed")
    assert 5 <= record.completion_tokens < 300
    assert record.prompt_tokens == prompt_tokens(MESSAGES) and record.cost > 0
    assert (await LedgerEntry.objects.aget(usage_record=record)).amount == -record.cost
