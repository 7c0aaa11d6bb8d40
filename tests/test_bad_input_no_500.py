"""Inputs that used to give a 500 get a clear 4xx in the documented shape (issue 12, item 8).

A credit that would overflow the money columns, JSON nested far too deep (RecursionError) on /v1 and
REST, NUL (%00) in a path, and NUL in a websocket frame's fields. PostgreSQL rejects NUL in text and
overflows NUMERIC(24, 10), so these run on PostgreSQL (SQLite accepts both).
"""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from django.test import Client

from tests.factories import make_api_key, make_user
from tests.test_chat_ws import _connect, _message
from usage.billing.ledger import grant_credits
from usage.models import CreditAccount, LedgerEntry

pytestmark = [pytest.mark.pg, pytest.mark.django_db(transaction=True)]

DEEP = [50_000, 100_000, 1_000]  # the first two raised RecursionError; 1000 parses but is past the limit


def _api_error(response, status: int = 400) -> dict:
    assert response.status_code == status, (response.status_code, response.content[:300])
    error = response.json()["error"]
    assert set(error) >= {"code", "message", "retryable"} and error["retryable"] is False
    return error


def _openai_error(response, status: int = 400) -> dict:
    assert response.status_code == status, (response.status_code, response.content[:300])
    error = response.json()["error"]
    assert set(error) == {"message", "type", "code", "param"} and error["type"] == "invalid_request_error"
    return error


@pytest.fixture
def staff_client(client):
    client.force_login(make_user("operator", staff=True))
    return client


def test_a_credit_that_would_overflow_the_balance_is_400(staff_client):
    alice = make_user("alice")
    grant_credits(user=alice, amount=Decimal("1"), reason="t", created_by=None)
    for amount in ("99999999999999", "99999999999999.5", "1e30"):
        response = staff_client.post("/api/usage/credits/", {"user": "alice", "amount": amount, "reason": "big"},
                                     content_type="application/json")
        assert _api_error(response)["code"] in ("invalid", "validation_error")
    assert CreditAccount.objects.get(user=alice).balance == Decimal("1")
    assert LedgerEntry.objects.filter(account__user=alice).count() == 1


@pytest.mark.parametrize("depth", DEEP)
def test_json_nested_too_deep_is_400_on_v1(depth, openai_account):
    body = "[" * depth + "]" * depth
    response = Client().post("/v1/chat/completions", body, content_type="application/json",
                             headers={"Authorization": openai_account.auth})
    assert _openai_error(response)["code"] == "invalid_json"


@pytest.mark.parametrize("depth", DEEP)
def test_json_nested_too_deep_is_400_on_the_api(depth, client):
    client.force_login(make_user("alice"))
    body = '{"agent": ' + "[" * depth + "]" * depth + "}"
    response = client.post("/api/conversations/", body, content_type="application/json")
    assert _api_error(response)["code"] == "bad_request"


def test_nul_in_a_v1_path_is_400_in_openai_shape(openai_account):
    response = Client().get("/v1/models/abc%00def", headers={"Authorization": openai_account.auth})
    assert _openai_error(response)["code"] == "invalid_value"


def test_nul_in_an_api_path_is_400(staff_client):
    for path in ("/api/providers/a%00b/", "/api/conversations/1%002/", "/api/agents/x%00/"):
        assert _api_error(staff_client.get(path))["code"] == "bad_request"


@pytest.mark.parametrize("field", ["agent", "project", "content", "client_id"])
async def test_nul_in_a_websocket_frame_is_bad_request(field, chat_agent, fake_upstream):
    from asgiref.sync import sync_to_async

    raw = (await sync_to_async(make_api_key)(await sync_to_async(make_user)("alice")))[1]
    communicator = await _connect(raw)
    await communicator.send_to(text_data=json.dumps(_message(**{field: "a\x00b"})))
    frame = await communicator.receive_json_from(timeout=5)
    assert frame["type"] == "error" and frame["code"] == "bad_request" and frame["retryable"] is False
    await communicator.send_json_to(_message())  # the socket stays open and serves the next message
    for _ in range(200):
        frame = await communicator.receive_json_from(timeout=5)
        if frame["type"] in ("done", "error"):
            break
    assert frame["type"] == "done" and frame["status"] == "success"
    await communicator.disconnect()
