"""The websocket's `message` frame and REST's message and conversation creates refuse the same inputs, naming
the same field (conversations/serializers.py MessageFrameInput is built from REST's fields)."""

import json

import pytest
from channels.testing import WebsocketCommunicator

from aiwriter.asgi import application
from tests.factories import make_api_key

pytestmark = [pytest.mark.django_db(transaction=True)]

TIMEOUT = 10

# (field, REST endpoint kind, bad value)
BAD = [
    ("content", "message", ""),
    ("content", "message", "   "),
    ("content", "message", 5),
    ("content", "message", None),
    ("content", "message", "x" * 51),
    ("client_id", "message", 7),
    ("client_id", "message", "c" * 65),
    ("agent", "create", 5),
    ("agent", "create", "a" * 101),
    ("project", "create", "p" * 101),
    ("project", "create", 3),
    ("new", "create", "yes"),
    ("new", "create", 1),
]


@pytest.mark.parametrize(("field", "kind", "value"), BAD)
async def test_rest_and_the_socket_refuse_the_same_input_naming_the_same_field(field, kind, value, alice,
                                                                               chat_agent, settings):
    from asgiref.sync import sync_to_async
    from rest_framework.test import APIClient

    settings.MAX_MESSAGE_CHARS = 50
    _, raw = await sync_to_async(make_api_key)(alice)
    good = {"agent": "helper", "content": "hi"}
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    if kind == "message":
        cid = (await sync_to_async(client.post)("/api/conversations/", {"agent": "helper"}, format="json")).json()["id"]
        url = f"/api/conversations/{cid}/messages/"
        response = await sync_to_async(client.post)(url, {"content": "hi", field: value}, format="json")
    else:
        response = await sync_to_async(client.post)("/api/conversations/", {"agent": "helper", field: value},
                                                    format="json")
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert list(error["fields"]) == [field]

    headers = [(b"origin", b"http://127.0.0.1"), (b"host", b"127.0.0.1"), (b"authorization", f"Bearer {raw}".encode())]
    communicator = WebsocketCommunicator(application, "/ws/chat/", headers=headers)
    connected, _ = await communicator.connect(timeout=TIMEOUT)
    assert connected
    await communicator.send_to(text_data=json.dumps({"type": "message", **good, field: value}))
    frame = await communicator.receive_json_from(timeout=TIMEOUT)
    await communicator.disconnect()
    assert frame["type"] == "error" and frame["code"] == "bad_request" and frame["retryable"] is False
    assert frame["message_text"] == error["message"]
    assert frame["message_text"].startswith(f"{field}: ")
