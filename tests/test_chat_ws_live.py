"""The websocket chat over a real socket: a `websockets` client against daphne in a subprocess."""

import asyncio
import json
import time
import urllib.request

import pytest
import websockets

from conversations.models import Message
from tests.factories import make_api_key

pytestmark = [pytest.mark.pg, pytest.mark.django_db(transaction=True)]


def test_live_server_daphne_serves_healthz(live_server_daphne):
    with urllib.request.urlopen(live_server_daphne + "/healthz", timeout=5) as response:
        assert response.status == 200


async def _chat(ws_url: str, headers: dict, frame: dict) -> list[dict]:
    frames = []
    async with websockets.connect(ws_url, additional_headers=headers, open_timeout=5) as socket:
        await socket.send(json.dumps(frame))
        async with asyncio.timeout(15):
            while True:
                frames.append(json.loads(await socket.recv()))
                if frames[-1]["type"] in ("done", "error"):
                    return frames


async def _closed_code(ws_url: str, headers: dict) -> int:
    async with websockets.connect(ws_url, additional_headers=headers, open_timeout=5) as socket:
        with pytest.raises(websockets.ConnectionClosed):
            async with asyncio.timeout(5):
                await socket.recv()
        return socket.close_code


def test_websocket_chat_against_daphne(live_server_daphne, alice, chat_agent, fake_upstream):
    _, raw_key = make_api_key(alice)
    ws_url = live_server_daphne.replace("http://", "ws://") + "/ws/chat/"
    origin = {"Origin": live_server_daphne}
    frame = {"type": "message", "conversation": None, "agent": "helper", "content": "Hello over TCP",
             "client_id": "0f4c1b1e-5d0e-4b8e-9a43-6d1f0c2b9e77"}

    frames = asyncio.run(_chat(ws_url, {**origin, "Authorization": f"Bearer {raw_key}"}, frame))

    assert [f["status"] for f in frames[:2]] == ["thinking", "generating"]
    text = "".join(f["content"] for f in frames if f["type"] == "delta")
    assert text == "Echo. System: You help alice. | User: Hello over TCP"
    done = frames[-1]
    assert done["type"] == "done" and done["status"] == "success" and done["usage"]["estimated"] is False
    reply = Message.objects.get(pk=done["message"])
    assert reply.content == text and reply.completion_tokens == done["usage"]["completion_tokens"]
    assert asyncio.run(_closed_code(ws_url, origin)) == 4401

    async def refused(headers: dict) -> int:
        with pytest.raises(websockets.InvalidStatus) as refusal:
            async with websockets.connect(ws_url, additional_headers=headers, open_timeout=5):
                pass
        return refusal.value.response.status_code

    # A foreign Origin (cross-site websocket hijacking) is refused at the handshake, even with a valid key.
    assert asyncio.run(refused({"Origin": "http://evil.example", "Authorization": f"Bearer {raw_key}"})) == 403


def test_rest_reply_over_daphne(live_server_daphne, alice, chat_agent, fake_upstream):
    _, raw_key = make_api_key(alice)
    headers = {"Authorization": f"Bearer {raw_key}", "Content-Type": "application/json"}

    def post(path, body):
        request = urllib.request.Request(live_server_daphne + path, data=json.dumps(body).encode(), headers=headers)
        with urllib.request.urlopen(request, timeout=15) as response:
            return response.status, json.loads(response.read())

    status, conversation = post("/api/conversations/", {"agent": "helper"})
    assert status == 201
    status, reply = post(f"/api/conversations/{conversation['id']}/messages/", {"content": "Hi", "client_id": "r1"})
    assert status == 201 and reply["status"] == "success" and reply["content"].endswith("User: Hi")
    assert post(f"/api/conversations/{conversation['id']}/messages/", {"content": "Hi", "client_id": "r1"}) == (
        200, reply)


def _wait_for_final_state(message_id: int, seconds: float = 20) -> Message:
    deadline = time.monotonic() + seconds
    while True:
        reply = Message.objects.select_related("conversation", "reply_to").get(pk=message_id)
        if reply.status != "processing" or time.monotonic() > deadline:
            return reply
        time.sleep(0.1)


def test_a_client_that_drops_mid_stream_leaves_the_reply_generating_to_the_end(live_server_daphne, alice,
                                                                                   chat_agent, fake_upstream):
    """The TCP connection is cut (no close frame) after a few deltas, as when a laptop lid closes."""
    from conversations import locks
    from usage.models import UsageRecord

    _, raw_key = make_api_key(alice)
    ws_url = live_server_daphne.replace("http://", "ws://") + "/ws/chat/"
    headers = {"Origin": live_server_daphne, "Authorization": f"Bearer {raw_key}"}
    fake_upstream.configure("chat-model", tokens=400, chunk_delay=0.02)

    async def drop_after_deltas() -> list[dict]:
        frames = []
        async with websockets.connect(ws_url, additional_headers=headers, open_timeout=5) as socket:
            await socket.send(json.dumps({"type": "message", "conversation": None, "agent": "helper",
                                          "content": "Tell me a long story", "client_id": "drop-1"}))
            async with asyncio.timeout(15):
                while sum(f["type"] == "delta" for f in frames) < 3:
                    frames.append(json.loads(await socket.recv()))
            socket.transport.abort()
        return frames

    frames = asyncio.run(drop_after_deltas())
    conversation_id, message_id = frames[0]["conversation"], frames[0]["message"]
    reply = _wait_for_final_state(message_id)
    # A dropped socket does not stop the reply (only a cancel frame does): it is generated to the end and billed.
    assert reply.status == "success" and reply.reply_to.status == "success"
    assert reply.completion_tokens == 400 and not reply.usage_estimated
    record = UsageRecord.objects.get(message=reply)
    assert record.completion_tokens == 400
    conversation = reply.conversation
    assert conversation.message_count == 2 and conversation.has_success
    assert not locks.is_locked(conversation_id, alice.pk)
    # The same conversation answers again at once.
    fake_upstream.configure("chat-model", tokens=5, chunk_delay=0)
    again = asyncio.run(_chat(ws_url, headers, {"type": "message", "conversation": conversation_id,
                                                "content": "Shorter, please", "client_id": "drop-2"}))
    assert again[-1]["type"] == "done" and again[-1]["status"] == "success"


@pytest.mark.redis
def test_a_stream_and_a_cancel_cross_daphne_processes(live_server_daphne, second_live_server_daphne, alice,
                                                      chat_agent, fake_upstream):
    """Tab 1 on one process sends; tab 2 on another process sees the same stream, and its cancel stops it."""
    from conversations.models import Conversation

    _, raw_key = make_api_key(alice)
    conversation = Conversation.objects.create(owner=alice, agent=chat_agent)
    auth = {"Authorization": f"Bearer {raw_key}"}
    url1 = live_server_daphne.replace("http://", "ws://") + "/ws/chat/"
    url2 = second_live_server_daphne.replace("http://", "ws://") + "/ws/chat/"

    async def recv(socket) -> dict:
        async with asyncio.timeout(15):
            return json.loads(await socket.recv())

    async def until(socket, frame_type: str) -> list[dict]:
        frames = [await recv(socket)]
        while frames[-1]["type"] != frame_type:
            frames.append(await recv(socket))
        return frames

    async def scenario() -> tuple[list[dict], list[dict], list[dict], list[dict]]:
        async with (websockets.connect(url1, additional_headers={**auth, "Origin": live_server_daphne}) as tab1,
                    websockets.connect(url2, additional_headers={**auth, "Origin": second_live_server_daphne})
                    as tab2):
            await tab2.send(json.dumps({"type": "subscribe", "conversation": conversation.pk}))
            assert await recv(tab2) == {"type": "subscribed", "conversation": conversation.pk}
            fake_upstream.configure("chat-model", chunk_delay=0.005)
            await tab1.send(json.dumps({"type": "message", "conversation": conversation.pk, "content": "Hi both",
                                        "client_id": "x-1"}))
            seen1, seen2 = await until(tab1, "done"), await until(tab2, "done")
            fake_upstream.configure("chat-model", tokens=2000, chunk_delay=0.01)
            await tab1.send(json.dumps({"type": "message", "conversation": conversation.pk, "content": "Go on",
                                        "client_id": "x-2"}))
            await until(tab2, "delta")
            await tab2.send(json.dumps({"type": "cancel", "conversation": conversation.pk}))
            return seen1, seen2, await until(tab1, "error"), await until(tab2, "error")

    seen1, seen2, cancelled1, cancelled2 = asyncio.run(scenario())
    text = "".join(f["content"] for f in seen2 if f["type"] == "delta")
    assert text == "".join(f["content"] for f in seen1 if f["type"] == "delta")
    assert text == "Echo. System: You help alice. | User: Hi both"
    assert [f["status"] for f in seen2 if f["type"] == "status"] == ["thinking", "generating"]
    assert seen2[-1] == seen1[-1] and seen2[-1]["status"] == "success"
    assert cancelled1[-1]["code"] == cancelled2[-1]["code"] == "cancelled"
    reply = _wait_for_final_state(cancelled1[-1]["message"])
    assert reply.status == "error" and reply.content.startswith("Echo") and 0 < reply.completion_tokens < 2000
