"""A socket's credential is re-checked on every frame: a key revoked (over REST) or expired, a user deactivated,
a session logged out — the next frame gets an `authentication_failed` error frame and the socket is closed with
4401, before anything is stored, called or charged (issue 12, item 2)."""

import asyncio
import json
import urllib.request
from datetime import timedelta
from decimal import Decimal

import pytest
import websockets
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.test import Client
from django.utils import timezone

from aiwriter.asgi import application
from conversations.models import Message
from tests.factories import make_agent, make_api_key, make_fake_model
from tests.fixtures_openai import fund
from usage.models import ApiKey, CreditAccount, UsageRecord

pytestmark = pytest.mark.django_db(transaction=True)

TIMEOUT = 5
HEADERS = [(b"origin", b"http://127.0.0.1"), (b"host", b"127.0.0.1")]


@pytest.fixture
def priced_agent(db, fake_upstream):
    """A priced model, so a call that slipped through would show as a charge."""
    model = make_fake_model(fake_upstream, "paid-model", input_price="2", output_price="8")
    return make_agent("helper", model=model, system_prompt="You help {user}.")


@pytest.fixture
def funded_alice(alice):
    fund(alice, "100")
    return alice


def _message(content="Hello there", **extra):
    return {"type": "message", "conversation": None, "agent": "helper", "content": content, **extra}


async def _connect(*, raw_key: str | None = None, cookie: str | None = None) -> WebsocketCommunicator:
    headers = list(HEADERS)
    if raw_key:
        headers.append((b"authorization", f"Bearer {raw_key}".encode()))
    if cookie:
        headers.append((b"cookie", f"{settings.SESSION_COOKIE_NAME}={cookie}".encode()))
    communicator = WebsocketCommunicator(application, "/ws/chat/", headers=headers)
    assert (await communicator.connect(timeout=TIMEOUT))[0]
    return communicator


async def _until(communicator, frame_type: str) -> list[dict]:
    frames = []
    for _ in range(2000):
        frames.append(await communicator.receive_json_from(timeout=TIMEOUT))
        if frames[-1]["type"] == frame_type:
            return frames
    raise AssertionError(f"no {frame_type} frame in {frames[-5:]}")


async def _refused_and_closed(communicator) -> None:
    """The frame just sent is answered with one error frame, then the socket closes with 4401."""
    frame = await communicator.receive_json_from(timeout=TIMEOUT)
    assert frame["type"] == "error" and frame["code"] == "authentication_failed" and frame["retryable"] is False
    assert await communicator.receive_output(timeout=TIMEOUT) == {"type": "websocket.close", "code": 4401}


async def _nothing_happened(user, fake_upstream, balance_before: Decimal) -> None:
    assert fake_upstream.requests == []
    assert not await Message.objects.filter(conversation__owner=user).aexists()
    assert not await UsageRecord.objects.filter(user=user).aexists()
    account = await CreditAccount.objects.aget(user=user)
    assert account.balance == balance_before and account.reserved == 0


def _session_cookie(user) -> tuple[Client, str]:
    client = Client()
    client.force_login(user)
    return client, client.cookies[settings.SESSION_COOKIE_NAME].value


async def test_a_key_revoked_over_rest_closes_its_open_socket_before_a_metered_chat(
        funded_alice, priced_agent, fake_upstream):
    key, raw = await sync_to_async(make_api_key)(funded_alice)
    socket = await _connect(raw_key=raw)
    await socket.send_json_to(_message("first"))  # the key works: a full, charged chat
    assert (await _until(socket, "done"))[-1]["status"] == "success"
    await Message.objects.filter(conversation__owner=funded_alice).adelete()
    await UsageRecord.objects.filter(user=funded_alice).adelete()
    fake_upstream.requests.clear()
    balance = (await CreditAccount.objects.aget(user=funded_alice)).balance

    # Revoked the way a user does it: from their signed-in session, over REST.
    session, _ = await sync_to_async(_session_cookie)(funded_alice)
    response = await sync_to_async(session.delete)(f"/api/keys/{key.pk}/")
    assert response.status_code == 204

    await socket.send_json_to(_message("after revocation"))
    await _refused_and_closed(socket)
    await _nothing_happened(funded_alice, fake_upstream, balance)


async def test_an_expired_key_and_a_deactivated_user_close_the_socket(funded_alice, priced_agent, fake_upstream):
    balance = (await CreditAccount.objects.aget(user=funded_alice)).balance
    key, raw = await sync_to_async(make_api_key)(funded_alice, expires_at=timezone.now() + timedelta(hours=1))
    socket = await _connect(raw_key=raw)
    await ApiKey.objects.filter(pk=key.pk).aupdate(expires_at=timezone.now() - timedelta(seconds=1))  # time passed
    await socket.send_json_to(_message())
    await _refused_and_closed(socket)

    _, raw = await sync_to_async(make_api_key)(funded_alice)
    socket = await _connect(raw_key=raw)
    await type(funded_alice).objects.filter(pk=funded_alice.pk).aupdate(is_active=False)
    await socket.send_json_to({"type": "subscribe", "conversation": 1})  # any frame, not only a message
    await _refused_and_closed(socket)
    await _nothing_happened(funded_alice, fake_upstream, balance)


async def test_a_logged_out_or_deactivated_session_closes_the_socket(funded_alice, priced_agent, fake_upstream):
    balance = (await CreditAccount.objects.aget(user=funded_alice)).balance
    client, cookie = await sync_to_async(_session_cookie)(funded_alice)
    socket = await _connect(cookie=cookie)
    await sync_to_async(client.post)("/accounts/logout/")
    await socket.send_json_to(_message())
    await _refused_and_closed(socket)

    _, cookie = await sync_to_async(_session_cookie)(funded_alice)
    socket = await _connect(cookie=cookie)
    await type(funded_alice).objects.filter(pk=funded_alice.pk).aupdate(is_active=False)
    await socket.send_json_to(_message())
    await _refused_and_closed(socket)
    await _nothing_happened(funded_alice, fake_upstream, balance)


async def test_a_live_session_and_key_keep_working(funded_alice, priced_agent, fake_upstream):
    """The check refuses only dead credentials: a second exchange on the same socket still runs."""
    _, cookie = await sync_to_async(_session_cookie)(funded_alice)
    _, raw = await sync_to_async(make_api_key)(funded_alice)
    for socket in (await _connect(cookie=cookie), await _connect(raw_key=raw)):
        for n in range(2):
            await socket.send_json_to(_message(f"turn {n}", new=True))
            assert (await _until(socket, "done"))[-1]["status"] == "success"
        await socket.disconnect()


async def test_a_subscribed_socket_with_a_revoked_key_stops_receiving_at_the_next_exchange(
        funded_alice, priced_agent, fake_upstream):
    from conversations.models import Conversation

    conversation = await Conversation.objects.acreate(owner=funded_alice, agent=priced_agent, title="t")
    revoked, revoked_raw = await sync_to_async(make_api_key)(funded_alice)
    _, good_raw = await sync_to_async(make_api_key)(funded_alice)
    watcher, sender = await _connect(raw_key=revoked_raw), await _connect(raw_key=good_raw)
    await watcher.send_json_to({"type": "subscribe", "conversation": conversation.pk})
    assert (await watcher.receive_json_from(timeout=TIMEOUT))["type"] == "subscribed"
    await ApiKey.objects.filter(pk=revoked.pk).aupdate(revoked_at=timezone.now())
    await sender.send_json_to(_message(conversation=conversation.pk))
    assert (await _until(sender, "done"))[-1]["status"] == "success"  # the other key's chat is unaffected
    await _refused_and_closed(watcher)  # instead of the stream
    await sender.disconnect()


@pytest.mark.pg
def test_revocation_over_http_closes_a_socket_on_a_real_daphne(live_server_daphne, funded_alice, priced_agent,
                                                                 fake_upstream):
    """Over real TCP: the key is revoked through the server's REST API from a signed-in session (another
    connection, served by whichever task of the process), the socket's next frame is refused with 4401."""
    key, raw = make_api_key(funded_alice)
    balance = CreditAccount.objects.get(user=funded_alice).balance
    _, cookie = _session_cookie(funded_alice)
    ws_url = live_server_daphne.replace("http://", "ws://") + "/ws/chat/"

    def revoke_over_http() -> int:
        csrf = "x" * 32  # the double-submit CSRF check: the cookie and the header carry the same token
        request = urllib.request.Request(
            f"{live_server_daphne}/api/keys/{key.pk}/", method="DELETE",
            headers={"Cookie": f"{settings.SESSION_COOKIE_NAME}={cookie}; {settings.CSRF_COOKIE_NAME}={csrf}",
                     "X-CSRFToken": csrf, "Origin": live_server_daphne, "Referer": live_server_daphne + "/"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status

    async def scenario() -> tuple[dict, int | None]:
        headers = {"Origin": live_server_daphne, "Authorization": f"Bearer {raw}"}
        async with websockets.connect(ws_url, additional_headers=headers, open_timeout=5) as socket:
            assert await asyncio.to_thread(revoke_over_http) == 204
            await socket.send(json.dumps(_message()))
            async with asyncio.timeout(10):
                frame = json.loads(await socket.recv())
                with pytest.raises(websockets.ConnectionClosed):
                    await socket.recv()
            return frame, socket.close_code

    frame, code = asyncio.run(scenario())
    assert frame["code"] == "authentication_failed" and code == 4401
    assert fake_upstream.requests == [] and not UsageRecord.objects.filter(user=funded_alice).exists()
    assert CreditAccount.objects.get(user=funded_alice).balance == balance
