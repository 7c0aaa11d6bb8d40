"""The non-streaming /v1 path stays lean: the view adds no query to the metered call itself once the key and
the model are in the process cache, and exactly two (key, model) when they are not."""

from __future__ import annotations

import pytest
from asgiref.sync import async_to_sync
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from openai_compat import calls, hotcache
from usage.metering import metered_complete

pytestmark = pytest.mark.django_db(transaction=True)

BODY = {"model": "fake-gpt", "messages": [{"role": "user", "content": "Count my queries"}]}


def test_view_adds_no_query_when_warm_and_key_and_model_lookups_when_cold(openai_account, fake_gpt, fake_upstream):
    # The sync test client runs the async view with its ORM calls on this thread, so they are captured.
    client = Client(headers={"Authorization": openai_account.auth})
    assert client.post("/v1/chat/completions", BODY, content_type="application/json").status_code == 200

    call = async_to_sync(calls.prepare_call)(account=openai_account.user, api_key=openai_account.key,
                                             model_name="fake-gpt", messages=BODY["messages"], entry_point="openai")
    with CaptureQueriesContext(connection) as metering_only:
        async_to_sync(metered_complete)(call.ctx, call.request)
    with CaptureQueriesContext(connection) as whole_request:
        assert client.post("/v1/chat/completions", BODY, content_type="application/json").status_code == 200

    # The key and the model were looked up by the first request and are cached in process (hotcache).
    assert len(whole_request) == len(metering_only), [q["sql"] for q in whole_request.captured_queries]

    hotcache.clear()  # cold: 1: the API key (with its user); 2: the model, with the key's allowed-models subquery
    with CaptureQueriesContext(connection) as cold_request:
        assert client.post("/v1/chat/completions", BODY, content_type="application/json").status_code == 200
    assert len(cold_request) - len(metering_only) == 2, [q["sql"] for q in cold_request.captured_queries]
