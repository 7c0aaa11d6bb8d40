"""An API key's limits on REST chat (post and retry): RPM/TPM as on /v1 and the writer endpoints, and the
monthly budget. A refused message stores nothing, so the same request (same client_id) goes through later.

AsyncClient: the whole test runs on one event loop, as under daphne (one Redis client per loop).
"""

from __future__ import annotations

from decimal import Decimal

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.test import AsyncClient

from conversations.models import Conversation, Message
from tests.factories import make_agent, make_fake_model
from tests.fixtures_openai import make_account, start_of_a_fresh_minute

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("close_thread_connections")]


class Chat:
    """REST chat as one API key."""

    def __init__(self, account):
        self.client = AsyncClient()
        self.headers = {"Authorization": account.auth}

    async def post(self, path: str, body: dict | None = None):
        return await self.client.post(path, body or {}, content_type="application/json", headers=self.headers)

    async def conversation(self, agent) -> int:
        return (await self.post("/api/conversations/", {"agent": agent.slug})).json()["id"]

    async def send(self, conversation_id: int, content: str = "Hello there", **body):
        return await self.post(f"/api/conversations/{conversation_id}/messages/", {"content": content, **body})


async def _as(**key_fields) -> Chat:
    account = await sync_to_async(make_account)(**key_fields)
    await sync_to_async(start_of_a_fresh_minute)()
    return Chat(account)


def _next_minute() -> None:
    """The key's counters start over, as in the next one-minute window."""
    from aiwriter.redis import get_redis, key
    from usage import keylimits

    keylimits.local_counters.clear()
    if settings.REDIS_URL:
        client = get_redis()
        for name in client.scan_iter(key("keylimit", "*")):
            client.delete(name)


async def test_over_its_rpm_a_key_gets_429_rate_limited_with_retry_after_and_nothing_stored(chat_agent,
                                                                                          fake_upstream):
    chat = await _as(rpm=1)
    cid = await chat.conversation(chat_agent)
    assert (await chat.send(cid, "first")).status_code == 201
    refused = await chat.send(cid, "second", client_id="c-2")
    assert refused.status_code == 429 and 1 <= int(refused["Retry-After"]) <= 60
    assert refused.json()["error"] == {"code": "rate_limited", "message": refused.json()["error"]["message"],
                                       "retryable": True, "limit": "requests"}
    assert len(fake_upstream.requests) == 1
    assert await Message.objects.filter(conversation_id=cid).acount() == 2
    assert (await Conversation.objects.aget(pk=cid)).message_count == 2

    await sync_to_async(_next_minute)()
    again = await chat.send(cid, "second", client_id="c-2")  # not a replay of the refusal: nothing was stored
    assert again.status_code == 201 and again.json()["status"] == "success"


async def test_a_replayed_client_id_is_not_counted(chat_agent, fake_upstream):
    chat = await _as(rpm=1)
    cid = await chat.conversation(chat_agent)
    first = await chat.send(cid, client_id="once")
    again = await chat.send(cid, client_id="once")
    assert (first.status_code, again.status_code) == (201, 200) and again.json()["id"] == first.json()["id"]
    assert (await chat.send(cid, "new one")).status_code == 429


async def test_a_retry_counts_as_a_request(chat_agent, fake_upstream):
    fake_upstream.configure("chat-model", status=500)
    chat = await _as(rpm=1)
    cid = await chat.conversation(chat_agent)
    failed = (await chat.send(cid)).json()["error"]["message_id"]
    fake_upstream.reset()
    response = await chat.post(f"/api/conversations/{cid}/messages/{failed}/retry/")
    assert response.status_code == 429 and response.json()["error"]["code"] == "rate_limited"
    assert "Retry-After" in response and fake_upstream.requests == []
    assert (await Conversation.objects.aget(pk=cid)).message_count == 2  # no new reply
    await sync_to_async(_next_minute)()
    assert (await chat.post(f"/api/conversations/{cid}/messages/{failed}/retry/")).status_code == 201


async def test_tpm_counts_the_replies_tokens(chat_agent, fake_upstream):
    fake_upstream.configure("chat-model", tokens=50)
    chat = await _as(tpm=60)
    cid = await chat.conversation(chat_agent)
    first = await chat.send(cid, "hi")
    assert first.status_code == 201 and first.json()["prompt_tokens"] + first.json()["completion_tokens"] > 60
    refused = await chat.send(cid, "hi again")
    assert refused.status_code == 429 and refused.json()["error"]["limit"] == "tokens"
    assert refused.json()["error"]["retryable"] is True and len(fake_upstream.requests) == 1


async def test_a_message_larger_than_the_whole_tpm_is_not_retryable(chat_agent, fake_upstream):
    chat = await _as(tpm=10)
    cid = await chat.conversation(chat_agent)
    response = await chat.send(cid, "word " * 40)
    error = response.json()["error"]
    assert response.status_code == 429 and error["code"] == "rate_limited" and error["retryable"] is False
    assert "Retry-After" not in response and fake_upstream.requests == []


async def test_a_spent_key_budget_is_429_key_budget_exceeded_before_the_upstream(fake_upstream):
    def paid_agent():
        return make_agent("paid", model=make_fake_model(fake_upstream, "paid-model", input_price="1",
                                                        output_price="2"))

    agent = await sync_to_async(paid_agent)()
    chat = await _as(monthly_budget=Decimal("0.0000000001"))
    cid = await chat.conversation(agent)
    assert (await chat.send(cid, "first")).status_code == 201  # nothing spent before it
    response = await chat.send(cid, "second")
    error = response.json()["error"]
    assert response.status_code == 429 and error["code"] == "key_budget_exceeded" and error["retryable"] is False
    assert (await Message.objects.aget(pk=error["message_id"])).status == "insufficient_balance"
    assert len(fake_upstream.requests) == 1
