"""A body over MAX_REQUEST_BYTES (DATA_UPLOAD_MAX_MEMORY_SIZE) is 413 request_too_large everywhere, not 400."""

import json

import pytest
from django.test import Client, override_settings

from conversations.models import Conversation
from tests.factories import make_agent, make_api_key, make_user

pytestmark = pytest.mark.django_db

LIMIT = 1000


@pytest.fixture
def bearer():
    _, raw = make_api_key(make_user())
    return {"Authorization": f"Bearer {raw}"}


def _post(path: str, body: dict, **headers):
    return Client().post(path, json.dumps(body), content_type="application/json", headers=headers)


def test_api_body_over_the_limit_is_413_in_our_error_shape(bearer):
    agent = make_agent()
    with override_settings(DATA_UPLOAD_MAX_MEMORY_SIZE=LIMIT):
        response = _post("/api/conversations/", {"agent": agent.slug, "title": "x" * 2 * LIMIT}, **bearer)
    assert response.status_code == 413
    assert response.json() == {"error": {"code": "request_too_large", "retryable": False,
                                         "message": f"The request body is larger than {LIMIT} bytes."}}
    assert not Conversation.objects.exists()


def test_api_body_under_the_limit_goes_through(bearer):
    agent = make_agent()
    with override_settings(DATA_UPLOAD_MAX_MEMORY_SIZE=LIMIT):
        response = _post("/api/conversations/", {"agent": agent.slug, "title": "short"}, **bearer)
    assert response.status_code == 201


def test_page_form_post_over_the_limit_is_413(client):
    """Outside DRF (here the login form) Django raises RequestDataTooBig too: its 400 handler answers 413."""
    with override_settings(DATA_UPLOAD_MAX_MEMORY_SIZE=LIMIT):
        response = client.post("/accounts/login/", {"username": "u", "password": "x" * 2 * LIMIT})
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


def test_api_and_v1_use_the_same_code(bearer):
    body = {"model": "any", "messages": [{"role": "user", "content": "x" * 2 * LIMIT}]}
    with override_settings(DATA_UPLOAD_MAX_MEMORY_SIZE=LIMIT):
        v1 = _post("/v1/chat/completions", body, **bearer)
        api = _post("/api/ai/generate-text/", {"prompt": "x" * 2 * LIMIT}, **bearer)
    assert v1.status_code == api.status_code == 413
    assert v1.json()["error"]["code"] == api.json()["error"]["code"] == "request_too_large"
