"""POST /api/conversations/{id}/messages/ and retry: replies, statuses, counters, idempotency."""

import pytest

from conversations.models import Conversation, Message
from tests.factories import make_agent, make_fake_model

pytestmark = pytest.mark.django_db


def _conversation(client, agent, **body):
    return client.post("/api/conversations/", {"agent": agent.slug, **body}, format="json").json()["id"]


def _send(client, conversation_id, content="Hello there", **body):
    return client.post(f"/api/conversations/{conversation_id}/messages/", {"content": content, **body},
                       format="json")


def test_reply_is_complete_with_usage_and_counters(alice_client, chat_agent, fake_upstream):
    cid = _conversation(alice_client, chat_agent)
    response = _send(alice_client, cid)
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["status"] == "success" and body["role"] == "assistant"
    assert body["content"] == "Echo. System: You help alice. | User: Hello there"
    assert body["prompt_tokens"] > 0 and body["completion_tokens"] > 0 and body["usage_estimated"] is False
    assert body["error_display"] is None and body["model_name"] == "chat-model"
    conversation = Conversation.objects.get(pk=cid)
    assert conversation.message_count == 2 and conversation.has_success
    assert conversation.total_tokens == body["prompt_tokens"] + body["completion_tokens"]
    assert conversation.title == "Hello there"
    user_message = Message.objects.get(pk=body["reply_to"])
    assert user_message.status == "success" and user_message.sequence + 1 == body["sequence"]


def test_repeated_client_id_returns_first_reply_without_a_second_call(alice_client, chat_agent, fake_upstream):
    cid = _conversation(alice_client, chat_agent)
    first = _send(alice_client, cid, client_id="c-1")
    again = _send(alice_client, cid, client_id="c-1")
    assert first.status_code == 201 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert len(fake_upstream.requests) == 1
    assert Conversation.objects.get(pk=cid).message_count == 2


def test_a_repeated_client_id_is_charged_once(alice, alice_client, fake_upstream):
    from decimal import Decimal

    from usage.billing.ledger import grant_credits
    from usage.models import CreditAccount, LedgerEntry, UsageRecord

    grant_credits(user=alice, amount=Decimal("5"), reason="test top-up", created_by=None)
    agent = make_agent("paid", model=make_fake_model(fake_upstream, "paid-model", input_price="1",
                                                     output_price="2"))
    cid = _conversation(alice_client, agent)
    first = _send(alice_client, cid, client_id="pay-once")
    assert first.status_code == 201 and Decimal(first.json()["cost"]) > 0
    for _ in range(3):
        again = _send(alice_client, cid, client_id="pay-once")
        assert again.status_code == 200 and again.json() == first.json()
    assert len(fake_upstream.requests) == 1
    assert UsageRecord.objects.filter(user=alice).count() == 1
    charges = LedgerEntry.objects.filter(account__user=alice, kind="charge")
    assert charges.count() == 1 and -charges.get().amount == Decimal(first.json()["cost"])
    assert CreditAccount.objects.get(user=alice).balance == Decimal("5") - Decimal(first.json()["cost"])


def test_a_repeated_client_id_of_a_failed_reply_replays_the_same_error(alice_client, chat_agent, fake_upstream):
    fake_upstream.configure("chat-model", status=500)
    cid = _conversation(alice_client, chat_agent)
    first = _send(alice_client, cid, client_id="fails")
    calls = len(fake_upstream.requests)
    fake_upstream.reset()  # the upstream would answer now: a replay must not ask it
    again = _send(alice_client, cid, client_id="fails")
    assert again.status_code == first.status_code and again.json()["error"] == first.json()["error"]
    assert first.json()["error"]["status"] == "llm_error" and calls >= 1 and fake_upstream.requests == []
    assert Conversation.objects.get(pk=cid).message_count == 2


def test_history_has_system_prompt_and_earlier_success_messages(alice_client, chat_agent, fake_upstream):
    cid = _conversation(alice_client, chat_agent)
    _send(alice_client, cid, "first question")
    fake_upstream.configure("chat-model", status=500)
    assert _send(alice_client, cid, "failed question").status_code == 502
    fake_upstream.reset()
    _send(alice_client, cid, "second question")
    messages = fake_upstream.requests[-1]["body"]["messages"]
    assert messages[0] == {"role": "system", "content": "You help alice."}
    assert [m["role"] for m in messages[1:]] == ["user", "assistant", "user"]  # the failed exchange is left out
    assert messages[1]["content"] == "first question" and messages[-1]["content"] == "second question"


def test_history_is_trimmed_to_the_context_window_oldest_first(alice, alice_client, fake_upstream):
    model = make_fake_model(fake_upstream, "tiny", context_window=400, max_output_tokens=100)
    agent = make_agent("tiny-agent", model=model, system_prompt="Short.")
    cid = _conversation(alice_client, agent)
    for n in range(6):
        assert _send(alice_client, cid, f"message number {n} " + "word " * 20).status_code == 201
    messages = fake_upstream.requests[-1]["body"]["messages"]
    from agents.llm import tokens

    assert tokens.count_messages(messages, "tiny") <= 400 - 100
    assert messages[0]["role"] == "system" and messages[-1]["content"].startswith("message number 5")
    assert not any(m["content"].startswith("message number 0") for m in messages)
    assert len(messages) < 12


def test_insufficient_balance_stores_user_message_without_calling_the_model(alice_client, fake_upstream):
    model = make_fake_model(fake_upstream, "priced", input_price="1000", output_price="1000")
    agent = make_agent("priced-agent", model=model)
    cid = _conversation(alice_client, agent)
    response = _send(alice_client, cid, "Hello")
    assert response.status_code == 402
    error = response.json()["error"]
    assert error["code"] == "insufficient_balance" and error["retryable"] is False
    reply = Message.objects.get(pk=error["message_id"])
    assert reply.status == "insufficient_balance" and reply.reply_to.content == "Hello"
    assert reply.reply_to.status == "insufficient_balance"
    assert fake_upstream.requests == []
    conversation = Conversation.objects.get(pk=cid)
    assert conversation.message_count == 2 and conversation.total_tokens == 0 and not conversation.has_success
    listed = alice_client.get(f"/api/conversations/{cid}/messages/").json()["results"]
    assert listed[1]["error_display"].startswith("Your credit balance")


def test_blocked_content_is_a_content_violation(alice_client, chat_agent, fake_upstream, settings):
    settings.MODERATION_BLOCKLIST = ["forbidden"]
    cid = _conversation(alice_client, chat_agent)
    response = _send(alice_client, cid, "this is Forbidden talk")
    assert response.status_code == 422 and response.json()["error"]["code"] == "content_violation"
    assert Message.objects.get(pk=response.json()["error"]["message_id"]).status == "content_violation"
    assert fake_upstream.requests == []
    assert _send(alice_client, cid, "a classy question").status_code == 201  # whole words only


def test_model_failure_is_llm_error_and_keeps_partial_text(alice_client, chat_agent, fake_upstream):
    fake_upstream.configure("chat-model", cut_after=3)
    cid = _conversation(alice_client, chat_agent)
    response = _send(alice_client, cid)
    assert response.status_code in (502, 504), response.content
    error = response.json()["error"]
    reply = Message.objects.get(pk=error["message_id"])
    assert reply.status == "llm_error" and reply.error_message
    assert reply.content.startswith("Echo.")  # the text that arrived is kept
    conversation = Conversation.objects.get(pk=cid)
    assert conversation.total_tokens == 0 and conversation.message_count == 2


def test_retry_a_failed_reply(alice_client, chat_agent, fake_upstream):
    fake_upstream.configure("chat-model", status=500)
    cid = _conversation(alice_client, chat_agent)
    failed = _send(alice_client, cid).json()["error"]["message_id"]
    fake_upstream.reset()
    response = alice_client.post(f"/api/conversations/{cid}/messages/{failed}/retry/")
    assert response.status_code == 201, response.content
    assert response.json()["status"] == "success" and response.json()["id"] != failed
    assert Message.objects.get(pk=failed).status == "llm_error"  # the failed reply is kept as it was
    again = alice_client.post(f"/api/conversations/{cid}/messages/{failed}/retry/")
    assert again.status_code == 409 and again.json()["error"]["code"] == "not_retryable"
    assert Conversation.objects.get(pk=cid).message_count == 3


def test_retry_of_a_successful_reply_is_refused(alice_client, chat_agent, fake_upstream):
    cid = _conversation(alice_client, chat_agent)
    mid = _send(alice_client, cid).json()["id"]
    response = alice_client.post(f"/api/conversations/{cid}/messages/{mid}/retry/")
    assert response.status_code == 409 and response.json()["error"]["code"] == "not_retryable"


def test_bad_bodies_get_the_error_shape(alice_client, chat_agent, settings):
    cid = _conversation(alice_client, chat_agent)
    assert _send(alice_client, cid, "").json()["error"]["code"] == "invalid"
    settings.MAX_MESSAGE_CHARS = 10
    response = _send(alice_client, cid, "x" * 11)
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid"


def test_messages_are_listed_by_sequence_and_paginated(alice_client, chat_agent, fake_upstream):
    cid = _conversation(alice_client, chat_agent)
    for n in range(3):
        _send(alice_client, cid, f"q{n}")
    page = alice_client.get(f"/api/conversations/{cid}/messages/?limit=4").json()
    assert page["count"] == 6 and len(page["results"]) == 4 and page["next"]
    assert [m["sequence"] for m in page["results"]] == sorted(m["sequence"] for m in page["results"])


def test_upstream_timeout_keeps_its_code(alice_client, fake_upstream):
    model = make_fake_model(fake_upstream, "slow")
    agent = make_agent("slow-agent", model=model, timeout_seconds=1)
    fake_upstream.configure("slow", hang=True)
    cid = _conversation(alice_client, agent)
    response = _send(alice_client, cid)
    error = response.json()["error"]
    assert response.status_code in (502, 504) and error["retryable"] is True
    assert Message.objects.get(pk=error["message_id"]).status == "llm_error"


def test_request_path_queries_do_not_grow_with_history(alice_client, chat_agent, fake_upstream,
                                                       django_assert_max_num_queries):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    cid = _conversation(alice_client, chat_agent)

    def send_counted(n):
        with CaptureQueriesContext(connection) as queries:
            assert _send(alice_client, cid, f"question {n}", client_id=f"c{n}").status_code == 201
        return len(queries)

    first = send_counted(0)
    for n in range(1, 6):
        _send(alice_client, cid, f"filler {n}")
    assert send_counted(6) <= first  # history is one query, whatever its length
    with django_assert_max_num_queries(40):  # chat's own ~22 plus metering's
        _send(alice_client, cid, "bounded", client_id="c7")


def test_monthly_quota_used_up_is_told_like_a_low_balance(alice, alice_client, chat_agent, fake_upstream):
    from usage.models import Quota

    Quota.objects.create(user=alice, monthly_token_limit=1)
    cid = _conversation(alice_client, chat_agent)
    assert _send(alice_client, cid, "first").status_code == 201  # under the limit before this call
    response = _send(alice_client, cid, "second", client_id="q2")
    error = response.json()["error"]
    assert response.status_code == 429 and error["code"] == "quota_exceeded"
    assert Message.objects.get(pk=error["message_id"]).status == "insufficient_balance"
    assert len(fake_upstream.requests) == 1
    again = _send(alice_client, cid, "second", client_id="q2")  # a replay tells the same, not "insufficient_balance"
    assert (again.status_code, again.json()) == (429, response.json())


def shouting_hook(text: str) -> str | None:
    """A stand-in for a classifier: MODERATION_HOOK may name any `(text) -> reason | None` callable."""
    return "No shouting." if text.isupper() else None


def test_the_moderation_hook_is_pluggable(alice_client, chat_agent, fake_upstream, settings):
    settings.MODERATION_HOOK = "tests.test_messages_api.shouting_hook"
    cid = _conversation(alice_client, chat_agent)
    response = _send(alice_client, cid, "HELLO THERE")
    error = response.json()["error"]
    assert response.status_code == 422 and error["code"] == "content_violation" and error["message"] == "No shouting."
    assert fake_upstream.requests == []
    assert _send(alice_client, cid, "hello there").status_code == 201


def test_max_tokens_is_capped_by_the_models_max_output_and_the_room_the_prompt_leaves(alice_client, fake_upstream):
    from agents.llm import tokens

    capped = make_agent("capped", model=make_fake_model(fake_upstream, "short-out", max_output_tokens=150),
                        max_tokens=5000)  # stored before the agent's max_tokens was validated
    assert _send(alice_client, _conversation(alice_client, capped)).status_code == 201
    assert fake_upstream.requests[-1]["body"]["max_tokens"] == 150

    # A model that may write its whole window: the reply gets the room the prompt leaves, not more.
    roomy = make_agent("roomy", model=make_fake_model(fake_upstream, "roomy", context_window=400,
                                                      max_output_tokens=400), max_tokens=400)
    cid = _conversation(alice_client, roomy)
    for n in range(3):
        assert _send(alice_client, cid, f"message number {n} " + "word " * 20).status_code == 201
        body = fake_upstream.requests[-1]["body"]
        assert body["max_tokens"] + tokens.count_messages(body["messages"], "roomy") <= 400
    assert body["max_tokens"] < 400
