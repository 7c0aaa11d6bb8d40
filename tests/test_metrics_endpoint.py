"""GET /metrics: who may read it, and what it shows after a metered model call."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from tests.factories import make_api_key, make_fake_model, make_user
from usage.models import UsageRecord

pytestmark = pytest.mark.django_db

TOKEN = "metrics-token-0123456789"


@pytest.fixture
def metrics_token(settings):
    settings.METRICS_TOKEN = TOKEN
    return TOKEN


def test_anonymous_gets_401(client, metrics_token):
    response = client.get("/metrics")
    assert response.status_code == 401
    assert response["WWW-Authenticate"] == "Bearer"
    assert response.json()["error"]["code"] == "not_authenticated"


def test_wrong_token_gets_401(client, metrics_token):
    response = client.get("/metrics", HTTP_AUTHORIZATION="Bearer not-the-token")
    assert response.status_code == 401


def test_token_is_refused_when_none_is_configured(client, settings):
    settings.METRICS_TOKEN = ""
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer ").status_code == 401
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer anything").status_code == 401


def test_an_api_key_is_not_a_metrics_token(client, metrics_token):
    _, raw = make_api_key(make_user(staff=True))
    assert client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {raw}").status_code == 401


def test_non_staff_user_gets_403(client):
    client.force_login(make_user())
    response = client.get("/metrics")
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "permission_denied"


def test_staff_user_reads_metrics(client):
    client.force_login(make_user(staff=True))
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    assert b"aiwriter_http_requests_total" in response.content


def test_token_reads_metrics(client, metrics_token):
    response = client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
    assert response.status_code == 200
    assert b"# TYPE aiwriter_open_websockets gauge" in response.content


def test_http_requests_are_counted_by_route(client, metrics_token):
    labels = {"route": "/healthz", "method": "GET", "status": "200"}
    before = REGISTRY.get_sample_value("aiwriter_http_requests_total", labels) or 0
    client.get("/healthz")
    client.get("/healthz")
    assert REGISTRY.get_sample_value("aiwriter_http_requests_total", labels) == before + 2


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.mark.django_db(transaction=True)
def test_a_usage_record_feeds_the_model_metrics(client, metrics_token):
    user = make_user()
    labels = {"model": "m-metrics", "provider": "p-metrics"}
    before = _sample("aiwriter_model_requests_total", **labels, entry_point="openai", status="success")
    UsageRecord.objects.create(user=user, model="m-metrics", provider="p-metrics", entry_point="openai",
                               prompt_tokens=10, completion_tokens=5, total_tokens=15, cost="0.25",
                               latency_ms=120, ttft_ms=40, cached=True)
    assert _sample("aiwriter_model_requests_total", **labels, entry_point="openai", status="success") == before + 1
    body = client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}").content.decode()
    assert 'aiwriter_model_tokens_total{kind="completion",model="m-metrics",provider="p-metrics"}' in body
    assert 'aiwriter_model_cache_hits_total{model="m-metrics",provider="p-metrics"}' in body
    assert 'aiwriter_model_ttft_seconds_count{model="m-metrics",provider="p-metrics"}' in body
    assert _sample("aiwriter_model_cost_total", **labels) >= 0.25


@pytest.mark.django_db(transaction=True)
def test_a_rolled_back_record_is_not_counted():
    from django.db import transaction

    user = make_user()
    labels = {"model": "m-rollback", "provider": "p", "entry_point": "chat", "status": "success"}
    with pytest.raises(RuntimeError), transaction.atomic():
        UsageRecord.objects.create(user=user, model="m-rollback", provider="p", entry_point="chat")
        raise RuntimeError("charge failed")
    assert _sample("aiwriter_model_requests_total", **labels) == 0


@pytest.mark.django_db(transaction=True)
async def test_metrics_after_a_metered_call(async_client, fake_upstream, settings):
    from asgiref.sync import sync_to_async

    from agents.llm.types import ChatRequest
    from usage.metering import CallContext, metered_complete

    settings.METRICS_TOKEN = TOKEN
    user = await sync_to_async(make_user)()
    model = await sync_to_async(make_fake_model)(fake_upstream, "metrics-fake", input_price="1", output_price="2")
    await sync_to_async(_give_credit)(user)  # charging needs credit
    await metered_complete(CallContext(user=user, entry_point="openai"),
                           ChatRequest(model=model.name, messages=[{"role": "user", "content": "hi"}]))
    response = await async_client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    body = response.content.decode()
    assert response.status_code == 200
    line = next(line for line in body.splitlines()
                if line.startswith("aiwriter_model_requests_total{") and 'model="metrics-fake"' in line)
    assert 'status="success"' in line and 'entry_point="openai"' in line
    assert float(line.rsplit(" ", 1)[1]) >= 1
    assert 'aiwriter_model_latency_seconds_count{model="metrics-fake"' in body


def _give_credit(user) -> None:
    from decimal import Decimal

    from usage.billing.ledger import grant_credits

    grant_credits(user=user, amount=Decimal("100"), reason="test top-up", created_by=None)


async def test_track_websockets_counts_open_sockets():
    from aiwriter.observability import OPEN_WEBSOCKETS, track_websockets

    seen = []

    async def app(scope, receive, send):
        await send({"type": "websocket.accept"})
        seen.append(OPEN_WEBSOCKETS._value.get())
        await receive()

    async def receive():
        return {"type": "websocket.disconnect"}

    async def send(message):
        pass

    before = OPEN_WEBSOCKETS._value.get()
    await track_websockets(app)({"type": "websocket"}, receive, send)
    assert seen == [before + 1]
    assert OPEN_WEBSOCKETS._value.get() == before


def test_breaker_states_are_read_at_scrape_time(client, metrics_token):
    from tests.factories import make_model

    make_model("m-health")
    body = client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}").content.decode()
    line = next(line for line in body.splitlines()
                if line.startswith("aiwriter_deployment_breaker_state{") and 'model="m-health"' in line
                and 'state="closed"' in line)
    assert line.endswith(" 1.0")
    assert any(line.startswith("aiwriter_deployment_healthy{") and 'model="m-health"' in line
               for line in body.splitlines())


async def test_the_deployed_websocket_app_counts_open_sockets(transactional_db):
    from asgiref.sync import sync_to_async
    from channels.testing import WebsocketCommunicator

    from aiwriter.asgi import application
    from aiwriter.observability import OPEN_WEBSOCKETS
    from tests.factories import make_api_key, make_user

    _, raw = await sync_to_async(make_api_key)(await sync_to_async(make_user)())
    before = OPEN_WEBSOCKETS._value.get()
    communicator = WebsocketCommunicator(application, "/ws/chat/", headers=[
        (b"origin", b"http://127.0.0.1"), (b"host", b"127.0.0.1"), (b"authorization", f"Bearer {raw}".encode())])
    connected, _ = await communicator.connect()
    assert connected and OPEN_WEBSOCKETS._value.get() == before + 1
    await communicator.disconnect()
    assert OPEN_WEBSOCKETS._value.get() == before
