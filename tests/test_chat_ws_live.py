"""The websocket chat over a real socket: a `websockets` client against daphne in a subprocess."""

import asyncio
import json
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
