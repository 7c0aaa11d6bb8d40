"""Websocket chat through Channels' WebsocketCommunicator against the real ASGI app (auth, origin check)."""

import asyncio
import json

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator

from aiwriter.asgi import application
from aiwriter.money import money_str
from conversations import locks
from conversations.models import Conversation, Message
from tests.factories import make_api_key

pytestmark = pytest.mark.django_db(transaction=True)

TIMEOUT = 5


async def _connect(raw_key: str | None = None, origin: str = "http://127.0.0.1") -> WebsocketCommunicator:
    headers = [(b"origin", origin.encode()), (b"host", b"127.0.0.1")]
    if raw_key:
        headers.append((b"authorization", f"Bearer {raw_key}".encode()))
    communicator = WebsocketCommunicator(application, "/ws/chat/", headers=headers)
    connected, _ = await communicator.connect(timeout=TIMEOUT)
    assert connected
    return communicator


@pytest.fixture
def alice_key(alice):
    return make_api_key(alice)[1]


@pytest.fixture
def bob_key(bob):
    return make_api_key(bob)[1]


async def _until(communicator, frame_type: str, limit: int = 2000) -> list[dict]:
    frames = []
    for _ in range(limit):
        frame = await communicator.receive_json_from(timeout=TIMEOUT)
        frames.append(frame)
        if frame["type"] == frame_type:
            return frames
    raise AssertionError(f"no {frame_type} frame in {frames[-5:]}")


def _message(content="Hello there", **extra):
    return {"type": "message", "conversation": None, "agent": "helper", "content": content,
            "client_id": "7b8f6a52-1d41-4c57-9f0e-2c5b3c0d1a11", **extra}


async def test_unauthenticated_socket_is_closed_with_4401(db):
    communicator = await _connect()
    output = await communicator.receive_output(timeout=TIMEOUT)
    assert output == {"type": "websocket.close", "code": 4401}


async def test_streams_thinking_generating_deltas_done_with_real_usage(alice_key, chat_agent, fake_upstream):
    fake_upstream.configure("chat-model", chunk_delay=0.001)
    communicator = await _connect(alice_key)
    await communicator.send_json_to(_message())
    frames = await _until(communicator, "done")
    await communicator.disconnect()

    reply = await Message.objects.select_related("conversation").aget(role="assistant")
    assert frames[0] == {"type": "status", "status": "thinking", "conversation": reply.conversation_id,
                         "message": reply.pk}
    assert frames[1]["type"] == "status" and frames[1]["status"] == "generating"
    deltas = [f for f in frames if f["type"] == "delta"]
    assert len(deltas) >= 2 and all(f["message"] == reply.pk for f in deltas)
    assert all(set(f) == {"type", "message", "content"} for f in deltas)
    assert [f["type"] for f in frames] == ["status", "status"] + ["delta"] * len(deltas) + ["done"]
    assert "".join(f["content"] for f in deltas) == reply.content == "Echo. System: You help alice. | User: Hello there"
    done = frames[-1]
    assert set(done) == {"type", "message", "status", "usage", "cost", "model", "fallback"}  # the public shape
    assert set(done["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens", "estimated"}
    assert done["message"] == reply.pk and done["status"] == "success" and done["fallback"] is False
    assert done["model"] == "chat-model" and done["cost"] == money_str(reply.cost)
    usage = done["usage"]
    assert usage["estimated"] is False and usage["completion_tokens"] == reply.completion_tokens > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens"] == reply.prompt_tokens > 0
    assert not await sync_to_async(locks.is_locked)(reply.conversation_id, reply.conversation.owner_id)


async def test_malformed_frames_get_bad_request_and_the_socket_stays_open(alice_key, chat_agent, fake_upstream):
    communicator = await _connect(alice_key)
    for raw in ["not json", "[1, 2]", json.dumps({"type": "nope"}), json.dumps({"type": "message", "content": 5}),
                json.dumps({"type": "cancel", "conversation": "x"}), json.dumps({"type": "subscribe"}),
                json.dumps({"type": "message", "conversation": True, "content": "hi"}),
                json.dumps({"type": "message", "content": "hi"}),  # no conversation and no agent
                json.dumps({"type": "message", "agent": "helper", "content": "hi", "client_id": 7}),
                "x" * 300_000, b"\x00binary"]:
        if isinstance(raw, bytes):
            await communicator.send_to(bytes_data=raw)
        else:
            await communicator.send_to(text_data=raw)
        frame = await communicator.receive_json_from(timeout=TIMEOUT)
        assert set(frame) == {"type", "code", "message_text", "retryable"}  # no reply exists: no "message"
        assert frame["type"] == "error" and frame["code"] == "bad_request" and frame["retryable"] is False
        assert frame["message_text"]
    await communicator.send_json_to(_message())
    assert (await _until(communicator, "done"))[-1]["status"] == "success"
    await communicator.disconnect()


async def test_second_tab_sees_the_same_stream(alice_key, chat_agent, fake_upstream):
    fake_upstream.configure("chat-model", latency=0.3)
    conversation = await sync_to_async(_make_conversation)(chat_agent)
    tab1, tab2 = await _connect(alice_key), await _connect(alice_key)
    await tab2.send_json_to({"type": "subscribe", "conversation": conversation.pk})
    assert await tab2.receive_json_from(timeout=TIMEOUT) == {"type": "subscribed", "conversation": conversation.pk}
    await tab1.send_json_to(_message(conversation=conversation.pk))
    seen1, seen2 = await _until(tab1, "done"), await _until(tab2, "done")
    text = "".join(f["content"] for f in seen2 if f["type"] == "delta")
    assert text == "".join(f["content"] for f in seen1 if f["type"] == "delta") and text.startswith("Echo.")
    assert seen2[0]["status"] == "thinking"
    await tab1.disconnect()
    await tab2.disconnect()


def _make_conversation(agent, owner=None):
    owner = owner or __import__("django.contrib.auth", fromlist=["get_user_model"]).get_user_model().objects.get(
        username="alice")
    return Conversation.objects.create(owner=owner, agent=agent)


async def test_bob_cannot_subscribe_post_or_cancel_in_alices_conversation(alice, bob_key, chat_agent, fake_upstream):
    conversation = await sync_to_async(_make_conversation)(chat_agent, alice)
    communicator = await _connect(bob_key)
    for frame in ({"type": "subscribe", "conversation": conversation.pk},
                  _message(conversation=conversation.pk),
                  {"type": "cancel", "conversation": conversation.pk}):
        await communicator.send_json_to(frame)
        reply = await communicator.receive_json_from(timeout=TIMEOUT)
        assert reply["type"] == "error" and reply["code"] == "not_found"
    assert await Message.objects.filter(conversation=conversation).acount() == 0
    assert fake_upstream.requests == []
    await communicator.disconnect()


async def test_cancel_mid_stream_keeps_text_and_frees_the_lock(alice_key, chat_agent, fake_upstream):
    fake_upstream.configure("chat-model", tokens=400, chunk_delay=0.01)
    communicator = await _connect(alice_key)
    await communicator.send_json_to(_message())
    frames = await _until(communicator, "delta")
    conversation_id = frames[0]["conversation"]
    await communicator.send_json_to({"type": "cancel", "conversation": conversation_id})
    frames = await _until(communicator, "error")
    assert frames[-1]["code"] == "cancelled" and frames[-1]["retryable"] is True
    await communicator.disconnect()
    reply = await Message.objects.select_related("conversation").aget(role="assistant")
    assert reply.status == "error" and reply.content.startswith("Echo") and reply.completion_tokens > 0
    assert reply.usage_estimated and reply.conversation.total_tokens == 0
    assert not await sync_to_async(locks.is_locked)(conversation_id, reply.conversation.owner_id)
    assert len(fake_upstream.requests) == 1


async def _final_reply(timeout: float = 20.0) -> Message:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        reply = await Message.objects.select_related("conversation", "reply_to").aget(role="assistant")
        if reply.status not in ("pending", "processing") or asyncio.get_running_loop().time() > deadline:
            return reply
        await asyncio.sleep(0.05)


async def test_a_reply_keeps_generating_when_its_socket_goes_away(alice, alice_key, chat_agent, fake_upstream):
    """A reload or a closed tab must not stop a reply (only a cancel frame does): it finishes and is stored."""
    from usage.models import UsageRecord

    fake_upstream.configure("chat-model", tokens=60, chunk_delay=0.01)
    communicator = await _connect(alice_key)
    await communicator.send_json_to(_message())
    frames = await _until(communicator, "delta")
    await communicator.disconnect(timeout=TIMEOUT)
    reply = await _final_reply()
    assert reply.status == "success" and reply.reply_to.status == "success", (reply.error_code, reply.error_message)
    assert reply.completion_tokens == 60 and not reply.usage_estimated
    assert not await sync_to_async(locks.is_locked)(frames[0]["conversation"], alice.pk)
    assert await UsageRecord.objects.filter(message=reply).acount() == 1
    # The conversation takes a new message at once.
    again = await _connect(alice_key)
    fake_upstream.configure("chat-model", tokens=5, chunk_delay=0)
    await again.send_json_to(_message("next", conversation=frames[0]["conversation"], client_id="c2"))
    assert (await _until(again, "done"))[-1]["status"] == "success"
    await again.disconnect()


async def test_a_reconnected_socket_follows_and_can_stop_a_running_reply(alice, alice_key, chat_agent, fake_upstream):
    fake_upstream.configure("chat-model", tokens=400, chunk_delay=0.02)
    first = await _connect(alice_key)
    await first.send_json_to(_message())
    frames = await _until(first, "delta")
    conversation_id, message_id = frames[0]["conversation"], frames[0]["message"]
    await first.disconnect(timeout=TIMEOUT)
    # The reopened page subscribes and keeps receiving the same reply's deltas.
    second = await _connect(alice_key)
    await second.send_json_to({"type": "subscribe", "conversation": conversation_id})
    followed = await _until(second, "delta")
    assert followed[-1]["message"] == message_id
    # Stop on the new socket reaches the generation the old socket started.
    await second.send_json_to({"type": "cancel", "conversation": conversation_id})
    error = (await _until(second, "error"))[-1]
    assert error["code"] == "cancelled" and error["message"] == message_id
    reply = await _final_reply()
    assert reply.status == "error" and reply.error_code == "cancelled" and 0 < reply.completion_tokens < 400
    assert not await sync_to_async(locks.is_locked)(conversation_id, alice.pk)
    await second.disconnect()


async def test_busy_conversation_is_refused_on_the_socket(alice_key, chat_agent, fake_upstream):
    fake_upstream.configure("chat-model", latency=0.5)
    communicator = await _connect(alice_key)
    await communicator.send_json_to(_message())
    first = await communicator.receive_json_from(timeout=TIMEOUT)
    await communicator.send_json_to(_message("again", conversation=first["conversation"], client_id="other"))
    frames = await _until(communicator, "error")
    assert frames[-1]["code"] == "conversation_busy" and frames[-1]["retryable"] is True
    assert (await _until(communicator, "done"))[-1]["status"] == "success"
    await communicator.disconnect()


async def test_insufficient_balance_is_told_on_the_socket(alice_key, fake_upstream):
    from tests.factories import make_agent, make_fake_model

    def setup():
        make_agent("helper", model=make_fake_model(fake_upstream, "dear", input_price="500", output_price="500"))

    await sync_to_async(setup)()
    communicator = await _connect(alice_key)
    await communicator.send_json_to(_message())
    frames = await _until(communicator, "error")
    assert frames[-1]["code"] == "insufficient_balance" and frames[-1]["retryable"] is False
    reply = await Message.objects.aget(pk=frames[-1]["message"])
    assert reply.status == "insufficient_balance" and fake_upstream.requests == []
    await communicator.disconnect()


async def test_same_client_id_replays_the_outcome(alice_key, chat_agent, fake_upstream):
    communicator = await _connect(alice_key)
    await communicator.send_json_to(_message())
    done = (await _until(communicator, "done"))[-1]
    await communicator.send_json_to(_message(conversation=(await Conversation.objects.aget()).pk))
    again = await _until(communicator, "done")
    assert again[-1] == done and len(fake_upstream.requests) == 1
    await communicator.disconnect()
    await asyncio.sleep(0)


async def test_a_foreign_origin_is_rejected(alice_key):
    headers = [(b"origin", b"http://evil.example"), (b"authorization", f"Bearer {alice_key}".encode())]
    communicator = WebsocketCommunicator(application, "/ws/chat/", headers=headers)
    connected, _ = await communicator.connect(timeout=TIMEOUT)
    assert not connected


async def test_blocked_content_is_refused_on_the_socket(alice_key, chat_agent, fake_upstream, settings):
    settings.MODERATION_BLOCKLIST = ["forbidden"]
    communicator = await _connect(alice_key)
    await communicator.send_json_to(_message("something forbidden"))
    frame = (await _until(communicator, "error"))[-1]
    assert frame["code"] == "content_violation" and frame["retryable"] is False
    assert (await Message.objects.aget(pk=frame["message"])).status == "content_violation"
    assert fake_upstream.requests == []
    await communicator.disconnect()


async def test_a_session_cookie_authenticates_the_socket(alice, chat_agent, fake_upstream):
    from django.conf import settings
    from django.test import Client

    def login_cookie():
        client = Client()
        client.force_login(alice)
        return client.cookies[settings.SESSION_COOKIE_NAME].value

    cookie = await sync_to_async(login_cookie)()
    headers = [(b"origin", b"http://127.0.0.1"), (b"host", b"127.0.0.1"),
               (b"cookie", f"{settings.SESSION_COOKIE_NAME}={cookie}".encode())]
    communicator = WebsocketCommunicator(application, "/ws/chat/", headers=headers)
    assert (await communicator.connect(timeout=TIMEOUT))[0]
    await communicator.send_json_to(_message())
    done = (await _until(communicator, "done"))[-1]
    assert done["status"] == "success"
    reply = await Message.objects.select_related("conversation").aget(pk=done["message"])
    assert reply.conversation.owner_id == alice.pk
    await communicator.disconnect()


async def test_an_unknown_or_revoked_key_is_closed_with_4401(alice, db):
    from django.utils import timezone

    from usage.models import ApiKey

    communicator = await _connect("aiw_not-a-real-key")
    assert await communicator.receive_output(timeout=TIMEOUT) == {"type": "websocket.close", "code": 4401}
    key, raw = await sync_to_async(make_api_key)(alice)
    await ApiKey.objects.filter(pk=key.pk).aupdate(revoked_at=timezone.now())
    communicator = await _connect(raw)
    assert await communicator.receive_output(timeout=TIMEOUT) == {"type": "websocket.close", "code": 4401}


async def test_a_socket_without_an_origin_header_is_rejected(alice_key):
    # Browsers always send Origin on a websocket handshake; we require it and check it against ALLOWED_HOSTS.
    communicator = WebsocketCommunicator(application, "/ws/chat/",
                                         headers=[(b"authorization", f"Bearer {alice_key}".encode())])
    connected, _ = await communicator.connect(timeout=TIMEOUT)
    assert not connected


async def test_messages_are_stored_pending_and_processing_before_the_model_answers(alice, alice_key, chat_agent,
                                                                                  fake_upstream):
    from rest_framework.test import APIClient

    fake_upstream.configure("chat-model", latency=1.0)
    communicator = await _connect(alice_key)
    await communicator.send_json_to(_message())
    thinking = await communicator.receive_json_from(timeout=TIMEOUT)
    assert thinking["status"] == "thinking"

    def listed():
        client = APIClient()
        client.force_authenticate(alice)
        return client.get(f"/api/conversations/{thinking['conversation']}/messages/").json()["results"]

    user_message, reply = await sync_to_async(listed)()
    assert (user_message["status"], user_message["content"], user_message["error_display"]) == (
        "pending", "Hello there", None)
    assert (reply["id"], reply["status"], reply["error_display"]) == (thinking["message"], "processing", None)
    assert await sync_to_async(locks.is_locked)(thinking["conversation"], alice.pk)
    assert (await _until(communicator, "done"))[-1]["status"] == "success"
    statuses = [m["status"] for m in await sync_to_async(listed)()]
    assert statuses == ["success", "success"]
    await communicator.disconnect()


async def test_bob_cannot_cancel_alices_generation_through_the_group(alice_key, bob_key, chat_agent, fake_upstream):
    fake_upstream.configure("chat-model", tokens=60, chunk_delay=0.01)
    alice_socket, bob_socket = await _connect(alice_key), await _connect(bob_key)
    await alice_socket.send_json_to(_message())
    conversation_id = (await alice_socket.receive_json_from(timeout=TIMEOUT))["conversation"]
    await bob_socket.send_json_to({"type": "cancel", "conversation": conversation_id})
    assert (await bob_socket.receive_json_from(timeout=TIMEOUT))["code"] == "not_found"
    assert (await _until(alice_socket, "done"))[-1]["status"] == "success"
    assert await bob_socket.receive_nothing(timeout=0.2)  # bob saw none of alice's frames
    await alice_socket.disconnect()
    await bob_socket.disconnect()


async def test_same_client_id_replays_a_failure_with_the_same_error_frame(alice_key, chat_agent, fake_upstream):
    fake_upstream.configure("chat-model", status=500)
    communicator = await _connect(alice_key)
    await communicator.send_json_to(_message(client_id="fails-once"))
    first = (await _until(communicator, "error"))[-1]
    assert first["code"] == "upstream_error" and first["retryable"] is True
    assert set(first) == {"type", "message", "code", "message_text", "retryable"}
    calls = len(fake_upstream.requests)
    conversation = await Conversation.objects.aget()
    await communicator.send_json_to(_message(conversation=conversation.pk, client_id="fails-once"))
    assert await communicator.receive_json_from(timeout=TIMEOUT) == first
    assert len(fake_upstream.requests) == calls
    await communicator.disconnect()


async def test_a_key_limited_to_other_models_cannot_chat_with_this_agent(alice, chat_agent, fake_upstream):
    from tests.factories import make_fake_model

    def limited_key():
        key, raw = make_api_key(alice, name="limited")
        key.allowed_models.add(make_fake_model(fake_upstream, "other-model"))
        return raw

    communicator = await _connect(await sync_to_async(limited_key)())
    await communicator.send_json_to(_message())
    frame = await communicator.receive_json_from(timeout=TIMEOUT)
    assert frame["type"] == "error" and frame["code"] == "unknown_agent"
    assert await Conversation.objects.acount() == 0 and fake_upstream.requests == []
    await communicator.disconnect()


async def test_new_true_starts_a_new_conversation_instead_of_the_deduplicated_one(alice_key, chat_agent, fake_upstream):
    communicator = await _connect(alice_key)
    await communicator.send_json_to(_message("first", client_id="a"))
    first = (await _until(communicator, "done"))[0]["conversation"]
    await communicator.send_json_to(_message("same again", client_id="b"))  # no `new`: the 5-minute dedupe
    assert (await _until(communicator, "done"))[0]["conversation"] == first
    await communicator.send_json_to(_message("fresh start", client_id="c", new=True))
    frames = await _until(communicator, "done")
    fresh = frames[0]["conversation"]
    assert fresh != first and frames[-1]["status"] == "success"
    assert fake_upstream.requests[-1]["body"]["messages"][1:] == [{"role": "user", "content": "fresh start"}]
    await communicator.send_json_to(_message("and on", client_id="d"))  # later dedupes find the new one
    assert (await _until(communicator, "done"))[0]["conversation"] == fresh
    assert await Conversation.objects.acount() == 2
    await communicator.disconnect()


async def test_a_new_true_frame_sent_again_replays_in_its_conversation(alice_key, chat_agent, fake_upstream):
    # The page's socket re-sends queued frames after a reconnect: the client_id still means one exchange.
    communicator = await _connect(alice_key)
    await communicator.send_json_to(_message("first", client_id="a"))
    await _until(communicator, "done")
    await communicator.send_json_to(_message("fresh", client_id="fresh-1", new=True))
    done = (await _until(communicator, "done"))[-1]
    await communicator.send_json_to(_message("fresh", client_id="fresh-1", new=True))
    assert await communicator.receive_json_from(timeout=TIMEOUT) == done
    assert await Conversation.objects.acount() == 2 and len(fake_upstream.requests) == 2
    await communicator.send_json_to(_message("fresh", client_id="x", new="yes"))
    frame = await communicator.receive_json_from(timeout=TIMEOUT)
    assert frame["code"] == "bad_request" and "new" in frame["message_text"]
    await communicator.disconnect()


async def test_a_keys_rate_limit_is_an_error_frame_with_retry_after(alice, chat_agent, fake_upstream):
    from tests.fixtures_openai import start_of_a_fresh_minute

    def limited_key():
        key, raw = make_api_key(alice, name="limited")
        key.rpm = 1
        key.save()
        return raw

    raw = await sync_to_async(limited_key)()
    await sync_to_async(start_of_a_fresh_minute)()
    communicator = await _connect(raw)
    await communicator.send_json_to(_message("first", client_id="a"))
    conversation = (await _until(communicator, "done"))[0]["conversation"]
    await communicator.send_json_to(_message("second", conversation=conversation, client_id="b"))
    frame = await communicator.receive_json_from(timeout=TIMEOUT)
    assert {k: frame[k] for k in ("type", "code", "retryable")} == {"type": "error", "code": "rate_limited",
                                                                   "retryable": True}
    assert set(frame) == {"type", "code", "message_text", "retryable", "retry_after"}  # no reply: nothing stored
    assert 1 <= frame["retry_after"] <= 60 and frame["message_text"]
    assert await Message.objects.acount() == 2 and len(fake_upstream.requests) == 1
    await communicator.disconnect()


async def test_max_tokens_is_capped_by_the_model_on_the_socket(alice_key, fake_upstream):
    from tests.factories import make_agent, make_fake_model

    def setup():
        make_agent("helper", model=make_fake_model(fake_upstream, "short-out", max_output_tokens=120),
                   max_tokens=9000)

    await sync_to_async(setup)()
    communicator = await _connect(alice_key)
    await communicator.send_json_to(_message())
    assert (await _until(communicator, "done"))[-1]["status"] == "success"
    assert fake_upstream.requests[-1]["body"]["max_tokens"] == 120
    await communicator.disconnect()
