"""Upstream faults through every entry point, with the end state each request must leave behind.

For each fault of the test upstream (500s, 429 with retry-after, connection refused, a hang past the
timeout, a stream cut midway, malformed SSE, no usage) the same priced agent — whose fallback model
fails the same way — is called through REST chat, the websocket, and /v1 (stream and not). Every
request must end with: a stored final status, an error code the client can act on, a usage record
(estimated where the upstream gave none), a free conversation lock, a settled credit hold, a balanced
ledger — and within the agent's timeout plus its fallback's (plus slack for a loaded machine).
"""

from __future__ import annotations

import asyncio
import json
import time
from decimal import Decimal

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.db import connections
from django.test import AsyncClient
from rest_framework.test import APIClient

from agents.models import Provider
from aiwriter.asgi import application
from conversations import consumers
from conversations.models import Conversation, Message
from tests.factories import make_agent, make_api_key, make_fake_model
from tests.fixtures_faults import free_port
from tests.fixtures_openai import fund
from usage.models import CreditAccount, UsageRecord

pytestmark = [pytest.mark.pg, pytest.mark.redis, pytest.mark.django_db(transaction=True)]

AGENT_TIMEOUT = 1  # seconds, the agent's; its fallback gets the same again
# Slack over 2 x AGENT_TIMEOUT for retries' backoff, recording and a loaded 2-core CI machine.
SLACK = 10.0

FAULTS = {
    "500": dict(status=500),
    "429_retry_after": dict(status=429, retry_after=0.2),
    "connection_refused": None,  # the providers point at a closed port
    "hang": dict(hang=True),
    "cut_midway": dict(tokens=40, cut_after=5),
    "malformed_sse": dict(tokens=20, malformed=True),
    "no_usage": dict(tokens=9, omit_usage=True),
}

# The code each fault must surface as (REST, websocket and /v1 alike): what a client acts on.
EXPECTED_CODE = {"500": "upstream_error", "429_retry_after": "rate_limited",
                 "connection_refused": "upstream_unavailable", "hang": "upstream_timeout"}


@pytest.fixture(autouse=True)
def _fast_backoff(settings):
    settings.LLM_RETRY_BASE_DELAY = 0.01
    settings.LLM_RETRY_MAX_DELAY = 0.2


@pytest.fixture
def setup(fake_upstream, alice):
    primary = make_fake_model(fake_upstream, "flaky", input_price="1", output_price="2")
    backup = make_fake_model(fake_upstream, "backup", input_price="1", output_price="2")
    # A provider timeout far above the agent's: only the agent's timeout (and its fallback's) may bound a hang.
    Provider.objects.update(max_retries=1, timeout=30)
    agent = make_agent("helper", model=primary, fallback_model=backup, timeout_seconds=AGENT_TIMEOUT,
                       system_prompt="Be brief.")
    fund(alice, "10")
    _, raw = make_api_key(alice)
    return agent, raw


def _apply(fault: str, fake_upstream) -> None:
    knobs = FAULTS[fault]
    if knobs is None:
        Provider.objects.update(base_url=f"http://127.0.0.1:{free_port()}/v1")
        return
    for upstream in ("flaky", "backup"):
        fake_upstream.configure(upstream, **knobs)


def _rest(alice, conversation) -> tuple[int, dict]:
    client = APIClient()
    client.force_authenticate(alice)
    response = client.post(f"/api/conversations/{conversation.pk}/messages/", {"content": "Tell me a fact"},
                           format="json")
    return response.status_code, response.json()


async def _ws(raw: str, conversation_id: int) -> list[dict]:
    communicator = WebsocketCommunicator(application, "/ws/chat/", headers=[
        (b"origin", b"http://127.0.0.1"), (b"host", b"127.0.0.1"), (b"authorization", f"Bearer {raw}".encode())])
    connected, _ = await communicator.connect(timeout=5)
    assert connected
    frames = []
    try:
        await communicator.send_json_to({"type": "message", "conversation": conversation_id,
                                         "content": "Tell me a fact"})
        while not frames or frames[-1]["type"] not in ("done", "error"):
            frames.append(await communicator.receive_json_from(timeout=2 * AGENT_TIMEOUT + SLACK))
        # A reply outlives its socket (docs/chat.md): let it end its final write and free its lock before this
        # test's event loop closes, as a server's loop would go on.
        running = consumers.RUNNING.get(conversation_id)
        if running is not None:
            await asyncio.wait([running], timeout=10)
    finally:
        await communicator.disconnect()
    return frames


async def _v1(raw: str, stream: bool) -> tuple[int, dict | list]:
    response = await AsyncClient().post(
        "/v1/chat/completions", {"model": "agent:helper", "stream": stream,
                                 "messages": [{"role": "user", "content": "Tell me a fact"}]},
        content_type="application/json", headers={"Authorization": f"Bearer {raw}"})
    if not stream or response.status_code != 200:
        return response.status_code, response.json()
    raw_events = b"".join([part async for part in response.streaming_content]).decode()
    events = [e.removeprefix("data: ") for e in raw_events.split("\n\n") if e]
    return 200, [e if e == "[DONE]" else json.loads(e) for e in events]


def _run_async(coro):
    async def wrapped():
        try:
            return await coro
        finally:
            await sync_to_async(connections.close_all)()

    return asyncio.run(wrapped())


def _timed(call):
    started = time.monotonic()
    result = call()
    elapsed = time.monotonic() - started
    assert elapsed < 2 * AGENT_TIMEOUT + SLACK, f"the request took {elapsed:.1f}s"
    return result


def _reply(conversation) -> Message:
    return Message.objects.filter(conversation=conversation, role=Message.Role.ASSISTANT).latest("sequence")


def _check_chat_reply(reply: Message, fault: str) -> None:
    records = UsageRecord.objects.filter(message_id=reply.pk)
    assert records.count() == 1, f"{fault}: one usage record per reply"
    record = records.get()
    if fault == "no_usage":
        assert reply.status == Message.Status.SUCCESS and reply.usage_estimated
        assert record.token_source == UsageRecord.TokenSource.ESTIMATED and record.charged and record.cost > 0
        assert reply.completion_tokens == 9 and reply.content
    else:
        assert reply.status == Message.Status.LLM_ERROR and reply.error_message
        if fault == "cut_midway" or fault == "malformed_sse":
            # Text arrived before the failure: kept on the reply and billed as partial, never zero.
            assert reply.content.startswith("Echo")
            assert record.token_source == UsageRecord.TokenSource.PARTIAL and record.charged and record.cost > 0
        else:
            assert reply.content == "" and not record.charged


@pytest.mark.parametrize("fault", list(FAULTS))
def test_every_entry_point_ends_settled_under_an_upstream_fault(fault, setup, alice, fake_upstream, assert_settled):
    agent, raw = setup
    _apply(fault, fake_upstream)
    balance_before = CreditAccount.objects.get(user=alice).balance
    failed = fault != "no_usage"

    # REST chat
    conversation = Conversation.objects.create(owner=alice, agent=agent)
    status, body = _timed(lambda: _rest(alice, conversation))
    if failed:
        assert status in (429, 502, 503, 504), body
        error = body["error"]
        assert error["code"] and error["retryable"] is True and error["message_id"] == _reply(conversation).pk
        assert error["code"] == EXPECTED_CODE.get(fault, error["code"]), error
    else:
        assert status == 201 and body["status"] == "success"
    _check_chat_reply(_reply(conversation), fault)
    assert_settled()

    # Websocket
    conversation = Conversation.objects.create(owner=alice, agent=agent, project="ws")
    frames = _timed(lambda: _run_async(_ws(raw, conversation.pk)))
    last = frames[-1]
    if failed:
        assert last["type"] == "error" and last["code"] and last["retryable"] is True
        assert last["code"] == EXPECTED_CODE.get(fault, last["code"]), last
        assert last["message"] == _reply(conversation).pk
    else:
        assert last["type"] == "done" and last["usage"]["estimated"] is True
    _check_chat_reply(_reply(conversation), fault)
    assert_settled()

    # /v1, whole reply and stream
    for stream in (False, True):
        before = UsageRecord.objects.filter(entry_point="openai").count()
        status, body = _timed(lambda stream=stream: _run_async(_v1(raw, stream)))
        if not failed:
            assert status == 200
        elif status == 200:  # the failure came after the stream had begun: an error event, then the end
            assert stream and fault in ("cut_midway", "malformed_sse")
            assert "error" in body[-1] and body[-1]["error"]["type"]
        else:
            assert status in (429, 502, 503, 504) and body["error"]["type"] and body["error"]["code"], body
        assert UsageRecord.objects.filter(entry_point="openai").count() == before + 1, f"{fault} stream={stream}"
        assert_settled()

    balance = CreditAccount.objects.get(user=alice).balance
    assert Decimal(0) <= balance <= balance_before
    if fault in ("500", "429_retry_after", "connection_refused", "hang"):
        assert balance == balance_before  # nothing delivered, nothing charged
