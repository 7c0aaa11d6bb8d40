"""Staff API for providers, models, agents and the AI service reports: wiring, shapes, permissions."""

import logging
from decimal import Decimal

import pytest
from django.utils import timezone

from agents.models import Agent, Deployment, LLMModel, Provider
from tests.factories import make_agent, make_fake_model, make_model, make_provider, make_user
from usage.models import ModelPrice

pytestmark = pytest.mark.django_db

SECRET = "sk-live-SECRET-0123456789abcdef"


@pytest.fixture
def staff(api_client):
    api_client.force_authenticate(make_user(staff=True))
    return api_client


def _provider_body(**over):
    body = {"name": "acme", "kind": "openai", "base_url": "http://127.0.0.1:9/v1", "api_key": SECRET, "weight": 2,
            "enabled": True, "rpm": 60, "tpm": None, "max_concurrency": 4, "timeout": 30.0, "max_retries": 1}
    body.update(over)
    return body


@pytest.mark.parametrize("url", ["/api/providers/", "/api/models/", "/api/agents/", "/api/ai-services/health/",
                                 "/api/ai-services/metrics/"])
def test_anonymous_gets_401_and_normal_user_403(api_client, url):
    response = api_client.get(url)
    assert response.status_code == 401 and response.json()["error"]["code"] == "not_authenticated"
    api_client.force_authenticate(make_user())
    response = api_client.get(url)
    assert response.status_code == 403 and response.json()["error"]["code"] == "permission_denied"


def test_normal_user_cannot_write(api_client):
    api_client.force_authenticate(make_user())
    assert api_client.post("/api/providers/", _provider_body(), format="json").status_code == 403
    assert api_client.post("/api/ai-services/cache/clear/", {}, format="json").status_code == 403
    assert not Provider.objects.exists()


def test_provider_crud_by_name_and_key_is_write_only(staff):
    created = staff.post("/api/providers/", _provider_body(), format="json")
    assert created.status_code == 201, created.content
    assert created.json() == {k: v for k, v in _provider_body().items() if k != "api_key"}
    assert Provider.objects.get(name="acme").api_key == SECRET
    assert staff.patch("/api/providers/acme/", {"rpm": 10}, format="json").json()["rpm"] == 10
    assert Provider.objects.get(name="acme").api_key == SECRET  # left out: kept
    listed = staff.get("/api/providers/")
    assert listed.json()["results"][0]["name"] == "acme"
    for response in (created, listed, staff.get("/api/providers/acme/")):
        assert SECRET not in response.content.decode() and SECRET[-4:] not in response.content.decode()
    assert staff.delete("/api/providers/acme/").status_code == 204
    assert staff.get("/api/providers/acme/").status_code == 404


def test_openai_provider_needs_base_url(staff):
    response = staff.post("/api/providers/", _provider_body(base_url=""), format="json")
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid"


def test_model_with_deployments_and_prices_as_decimal_strings(staff):
    make_provider("p1", kind="openai", base_url="http://127.0.0.1:9/v1")
    make_provider("p2", kind="openai", base_url="http://127.0.0.1:9/v1")
    body = {"name": "gpt-x", "input_price_per_million": "2.5", "cached_input_price_per_million": "1.25",
            "output_price_per_million": "10", "context_window": 128000, "strategy": "round_robin", "enabled": True,
            "deployments": [{"provider": "p1", "upstream_model": "gpt-x-1", "weight": 3},
                            {"provider": "p2", "upstream_model": "gpt-x-2", "weight": 1}]}
    created = staff.post("/api/models/", body, format="json")
    assert created.status_code == 201, created.content
    assert created.json() == body
    assert staff.get("/api/models/gpt-x/").json() == body
    price = ModelPrice.objects.get(model__name="gpt-x")
    assert price.input_per_million == Decimal("2.5") and price.output_per_million == Decimal("10")


def test_changing_a_price_adds_a_row_effective_now(staff):
    model = make_model("priced", input_price="1", output_price="2")
    before = timezone.now()
    assert staff.patch("/api/models/priced/", {"context_window": 4096}, format="json").status_code == 200
    assert ModelPrice.objects.filter(model=model).count() == 1  # no price given: no new row
    response = staff.patch("/api/models/priced/", {"output_price_per_million": "3.0001"}, format="json")
    assert response.json()["output_price_per_million"] == "3.0001"
    assert response.json()["input_price_per_million"] == "1"
    rows = list(ModelPrice.objects.filter(model=model).order_by("effective_from"))
    assert len(rows) == 2 and rows[1].effective_from >= before and rows[0].output_per_million == Decimal("2")
    staff.patch("/api/models/priced/", {"output_price_per_million": "3.0001"}, format="json")
    assert ModelPrice.objects.filter(model=model).count() == 2  # same price: unchanged


def test_deployments_are_replaced_by_provider_name(staff):
    model = make_model("dep-m")
    make_provider("other", kind="openai", base_url="http://127.0.0.1:9/v1")
    response = staff.patch("/api/models/dep-m/", {"deployments": [
        {"provider": "other", "upstream_model": "u2", "weight": 5}]}, format="json")
    assert response.status_code == 200
    assert response.json()["deployments"] == [{"provider": "other", "upstream_model": "u2", "weight": 5}]
    assert list(Deployment.objects.filter(model=model).values_list("upstream_model", flat=True)) == ["u2"]
    bad = staff.patch("/api/models/dep-m/", {"deployments": [{"provider": "nope", "upstream_model": "x"}]},
                      format="json")
    assert bad.status_code == 400


def test_provider_serving_a_model_cannot_be_deleted(staff):
    model = make_model("served")
    provider = model.deployments.get().provider
    response = staff.delete(f"/api/providers/{provider.name}/")
    assert response.status_code == 409 and response.json()["error"]["code"] == "provider_in_use"
    assert Deployment.objects.filter(model=model).exists()


def test_model_used_by_an_agent_cannot_be_deleted(staff):
    agent = make_agent()
    response = staff.delete(f"/api/models/{agent.model.name}/")
    assert response.status_code == 409 and response.json()["error"]["code"] == "model_in_use"


def test_agent_crud_by_slug_with_models_by_name(staff):
    make_model("main-m")
    make_model("backup-m")
    body = {"slug": "writer", "name": "Writer", "system_prompt": "Hi {user}", "model": "main-m",
            "fallback_model": "backup-m", "timeout_seconds": 30, "temperature": 0.3, "max_tokens": 500,
            "enabled": True}
    created = staff.post("/api/agents/", body, format="json")
    assert created.status_code == 201, created.content
    assert created.json() == body
    assert staff.patch("/api/agents/writer/", {"fallback_model": None}, format="json").json()["fallback_model"] is None
    same = staff.patch("/api/agents/writer/", {"fallback_model": "main-m"}, format="json")
    assert same.status_code == 400
    assert staff.delete("/api/agents/writer/").status_code == 204 and not Agent.objects.exists()


def test_health_lists_deployments(staff):
    make_model("h-m")
    response = staff.get("/api/ai-services/health/")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] in ("healthy", "degraded", "unhealthy")
    row = body["deployments"][0]
    # The row's fields are public, `breaker` and `state` too (aliases of breaker_state).
    assert set(row) == {"deployment_id", "model", "provider", "upstream_model", "enabled", "status", "breaker_state",
                        "breaker", "state", "healthy", "response_time_ms", "error_rate", "recent_calls", "last_error",
                        "last_check", "probe_status"}
    assert row["breaker"] == row["state"] == row["breaker_state"] == "closed" and row["model"] == "h-m"


def test_metrics_validates_range(staff):
    assert staff.get("/api/ai-services/metrics/?start=yesterday").status_code == 400
    response = staff.get("/api/ai-services/metrics/?start=2026-01-02T00:00:00Z&end=2026-01-01T00:00:00Z")
    assert response.status_code == 400


def test_cache_clear_reports_per_tier(staff):
    response = staff.post("/api/ai-services/cache/clear/", {"tier": "memory"}, format="json")
    assert response.status_code == 200 and response.json() == {"cleared": {"memory": 0}}
    assert staff.post("/api/ai-services/cache/clear/", {"tier": "disk"}, format="json").status_code == 400
    assert set(staff.post("/api/ai-services/cache/clear/", {}, format="json").json()["cleared"]) == {
        "memory", "redis"}


@pytest.mark.django_db(transaction=True)
async def test_api_key_never_in_logs_even_when_the_upstream_fails(fake_upstream, caplog):
    from asgiref.sync import sync_to_async

    from agents.llm import service
    from agents.llm.types import ChatRequest, LLMError

    caplog.set_level(logging.DEBUG)
    model = await sync_to_async(make_fake_model)(fake_upstream, "leak-m", upstream_model="leak", api_key=SECRET)
    fake_upstream.configure("leak", status=401)
    with pytest.raises(LLMError) as info:
        await service.complete(ChatRequest(model=model.name, messages=[{"role": "user", "content": "x"}]))
    fake_upstream.configure("leak", status=500)
    with pytest.raises(LLMError):
        await service.complete(ChatRequest(model=model.name, messages=[{"role": "user", "content": "x"}]))
    assert fake_upstream.requests[0]["authorization"] == f"Bearer {SECRET}"  # it was sent upstream
    assert SECRET not in str(info.value) and SECRET not in repr(info.value.__dict__)
    assert caplog.records and all(SECRET not in r.getMessage() for r in caplog.records)
    assert SECRET not in caplog.text
    deployment = await sync_to_async(lambda: model.deployments.select_related("provider").first())()
    assert SECRET not in repr(deployment.provider) and SECRET not in str(deployment.provider)


def test_metrics_report_calls_and_cost(staff, fake_upstream):
    from asgiref.sync import async_to_sync

    from agents.llm import service
    from agents.llm.types import ChatRequest

    model = make_fake_model(fake_upstream, "met-m", upstream_model="met")
    fake_upstream.configure("met", tokens=5)
    for temperature in (0, 0, 0.5):
        async_to_sync(service.complete)(ChatRequest(model=model.name, temperature=temperature,
                                                    messages=[{"role": "user", "content": "x"}]))
    body = staff.get("/api/ai-services/metrics/").json()
    assert body["summary"]["total_requests"] == 3 and body["summary"]["cache_hits"] == 1
    assert body["summary"]["total_cost"] == "0" and body["cache"]["hits"] == 1
    summary = body["summary"]
    assert summary["error_rate"] == 0 and summary["cache_hit_rate"] == pytest.approx(1 / 2)  # 2 lookups, 1 hit
    assert summary["average_latency_ms"] is not None and summary["average_latency_ms"] >= 0
    dep = body["deployments"][0]
    assert dep["model"] == "met-m" and dep["requests"] == 2 and dep["completion_tokens"] == 10
    assert dep["p50_latency_ms"] is not None and dep["p99_latency_ms"] >= dep["p50_latency_ms"]
    assert LLMModel.objects.filter(name="met-m").exists()


def test_metrics_range_and_total_cost_from_usage(staff, fake_upstream):
    from datetime import timedelta

    from asgiref.sync import async_to_sync

    from agents.llm.types import ChatRequest
    from usage.billing.ledger import grant_credits
    from usage.metering import CallContext, metered_complete

    user = make_user()
    grant_credits(user=user, amount=Decimal("1"), reason="t", created_by=None)
    model = make_fake_model(fake_upstream, "cost-m", upstream_model="cost", input_price="3", output_price="7")
    fake_upstream.configure("cost", tokens=5)
    metered = async_to_sync(metered_complete)(CallContext(user=user, entry_point="openai"), ChatRequest(
        model=model.name, messages=[{"role": "user", "content": "x"}]))
    assert metered.cost > 0
    body = staff.get("/api/ai-services/metrics/").json()
    assert body["summary"]["total_requests"] == 1 and Decimal(body["summary"]["total_cost"]) == metered.cost
    assert Decimal(body["models"][0]["cost"]) == Decimal(body["deployments"][0]["cost"]) == metered.cost
    later = (timezone.now() + timedelta(hours=1)).isoformat()
    empty = staff.get("/api/ai-services/metrics/", {"start": later}).json()
    assert empty["summary"]["total_requests"] == 0 and empty["summary"]["total_cost"] == "0"


def test_cache_clear_by_pattern_through_the_api(staff, fake_upstream):
    from asgiref.sync import async_to_sync

    from agents.llm import service
    from agents.llm.types import ChatRequest

    make_fake_model(fake_upstream, "clr-m", upstream_model="clr")
    request = ChatRequest(model="clr-m", temperature=0, messages=[{"role": "user", "content": "x"}])
    async_to_sync(service.complete)(request)
    assert async_to_sync(service.complete)(request).cache_hit
    assert staff.post("/api/ai-services/cache/clear/", {"pattern": "other-m:*"}, format="json").json() == {
        "cleared": {"memory": 0, "redis": 0}}
    assert staff.post("/api/ai-services/cache/clear/", {"pattern": "clr-m:*", "tier": "all"},
                      format="json").json() == {"cleared": {"memory": 1, "redis": 1}}
    assert not async_to_sync(service.complete)(request).cache_hit
