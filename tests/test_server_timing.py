"""Server-Timing on responses: total app time, DB time and named phases from timing()."""

from __future__ import annotations

import re

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth import get_user_model
from django.http import HttpResponse
from django.test import RequestFactory

from aiwriter.observability import ObservabilityMiddleware, add_timing, timing
from tests.factories import make_api_key, make_user

pytestmark = pytest.mark.django_db


def _phases(header: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"([\w-]+);dur=([\d.]+)", header)}


def test_api_response_has_app_and_db_time(client):
    _, raw = make_api_key(make_user())
    response = client.get("/api/me/", HTTP_AUTHORIZATION=f"Bearer {raw}")
    assert response.status_code == 200
    phases = _phases(response["Server-Timing"])
    assert {"app", "db"} <= set(phases)
    assert phases["app"] >= phases["db"] >= 0
    queries = int(re.search(r'db;dur=[\d.]+;desc="(\d+) queries"', response["Server-Timing"]).group(1))
    assert queries >= 1  # the API-key lookup


def test_error_responses_have_it_too(client):
    response = client.get("/api/me/")
    assert response.status_code == 401
    assert "app;dur=" in response["Server-Timing"]


def test_timing_adds_named_phases_and_sums_repeats():
    def view(request):
        with timing("quota"):
            pass
        with timing("quota"):
            pass
        add_timing("upstream", 12.5)
        return HttpResponse("ok")

    response = ObservabilityMiddleware(view)(RequestFactory().get("/x"))
    phases = _phases(response["Server-Timing"])
    assert phases["upstream"] == 12.5
    assert "quota" in phases
    assert response["Server-Timing"].count("quota;") == 1


def test_timing_outside_a_request_is_a_no_op():
    with timing("auth"):
        pass
    add_timing("upstream", 1.0)


async def test_async_view_counts_db_queries_made_in_threads():
    async def view(request):
        with timing("auth"):
            await sync_to_async(lambda: list(get_user_model().objects.all()))()
        return HttpResponse("ok")

    response = await ObservabilityMiddleware(view)(RequestFactory().get("/x"))
    header = response["Server-Timing"]
    assert 'desc="1 queries"' in header
    assert "auth;dur=" in header


async def test_a_v1_call_names_auth_quota_upstream_and_metering(openai_account, fake_gpt, fake_upstream):
    from django.test import AsyncClient

    fake_upstream.configure("fake-gpt", latency=0.05)
    response = await AsyncClient().post(
        "/v1/chat/completions", {"model": "fake-gpt", "messages": [{"role": "user", "content": "hi"}]},
        content_type="application/json", headers={"Authorization": openai_account.auth})
    assert response.status_code == 200
    phases = _phases(response["Server-Timing"])
    assert {"app", "db", "auth", "quota", "upstream", "metering"} <= set(phases), response["Server-Timing"]
    assert phases["upstream"] >= 50 and phases["app"] >= phases["upstream"]
