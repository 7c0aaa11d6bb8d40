"""Deployment health from live traffic and from the probe command; metrics per deployment and model."""

import io

import pytest
from asgiref.sync import async_to_sync
from django.core.management import call_command

from agents import selectors
from agents.llm import service
from agents.llm.types import ChatRequest, LLMError
from agents.models import Deployment, LLMModel
from tests.factories import add_fake_deployment, make_fake_model

pytestmark = pytest.mark.django_db(transaction=True)

MESSAGES = [{"role": "user", "content": "hi"}]


def _call(model: str, **kw):
    return async_to_sync(service.complete)(ChatRequest(model=model, messages=MESSAGES, **kw))


def _rows() -> dict[str, selectors.DeploymentHealth]:
    return {row.upstream_model: row for row in selectors.deployment_health()}


def test_live_errors_make_a_deployment_unhealthy_and_traffic_avoids_it(fake_upstream, settings):
    settings.LLM_RETRY_BASE_DELAY = 0.001
    model = LLMModel.objects.create(name="hl", strategy="round_robin")
    add_fake_deployment(fake_upstream, model, "good")
    add_fake_deployment(fake_upstream, model, "bad", max_retries=0)
    fake_upstream.configure("bad", status=500)
    for _ in range(8):
        _call("hl")
    rows = _rows()
    assert rows["bad"].status == "unhealthy" and rows["bad"].error_rate > 0.5
    assert rows["good"].status == "healthy" and rows["good"].response_time_ms is not None
    assert rows["bad"].last_error == "upstream_error" and rows["bad"].last_check
    bad_calls = len(fake_upstream.requests_for("bad"))
    for _ in range(4):
        _call("hl")
    assert len(fake_upstream.requests_for("bad")) == bad_calls  # skipped while unhealthy
    assert selectors.service_health()["status"] == "degraded"


def test_all_deployments_failing_makes_the_service_unhealthy(fake_upstream, settings):
    settings.LLM_RETRY_BASE_DELAY = 0.001
    make_fake_model(fake_upstream, "down", upstream_model="d")
    fake_upstream.configure("d", status=503)
    for _ in range(2):
        with pytest.raises(LLMError):
            _call("down")
    assert selectors.service_health()["status"] == "unhealthy"


def test_probe_records_health_and_routing_skips_failed_probes(fake_upstream):
    model = LLMModel.objects.create(name="probed", strategy="round_robin")
    add_fake_deployment(fake_upstream, model, "up")
    add_fake_deployment(fake_upstream, model, "down")
    fake_upstream.configure("down", status=500)
    call_command("probe_deployments", "--timeout", "2", stdout=io.StringIO())
    states = dict(Deployment.objects.values_list("upstream_model", "health_status"))
    assert states == {"up": "healthy", "down": "unhealthy"}
    assert Deployment.objects.get(upstream_model="down").last_check_at is not None
    assert all(r["body"]["max_tokens"] == 1 for r in fake_upstream.requests)
    fake_upstream.requests.clear()
    for _ in range(4):
        assert _call("probed").upstream_model == "up"
    assert _rows()["down"].status == "unhealthy"


def test_probe_times_out_a_hanging_deployment(fake_upstream):
    make_fake_model(fake_upstream, "hung", upstream_model="h")
    fake_upstream.configure("h", hang=True)
    call_command("probe_deployments", "--model", "hung", "--timeout", "0.3", stdout=io.StringIO())
    deployment = Deployment.objects.get(upstream_model="h")
    assert deployment.health_status == "unhealthy" and deployment.last_error == "upstream_timeout"


def test_metrics_per_deployment_and_model_with_percentiles(fake_upstream):
    make_fake_model(fake_upstream, "mm", upstream_model="m")
    fake_upstream.configure("m", tokens=4)
    for _ in range(5):
        _call("mm")
    fake_upstream.configure("m", tokens=4, latency=0.2)
    _call("mm")
    snap = selectors.service_metrics()
    (dep,) = snap["deployments"]
    (model,) = snap["models"]
    assert dep["requests"] == 6 and dep["successes"] == 6 and dep["completion_tokens"] == 24
    assert dep["p99_latency_ms"] >= 150 and dep["p50_latency_ms"] < 150
    assert model["requests"] == 6 and model["avg_ttft_ms"] is not None
    assert snap["summary"]["total_requests"] == 6 and snap["summary"]["error_rate"] == 0


def test_route_lookup_is_cached_between_calls(fake_upstream, django_assert_num_queries):
    make_fake_model(fake_upstream, "hot", upstream_model="hot")
    _call("hot")
    with django_assert_num_queries(0):
        _call("hot")


_CHILD = """
import django
django.setup()
from agents.llm import metrics
for ms in (10, 20, 30):
    metrics.record_attempt(deployment_id=31337, model="xproc", provider="p", upstream_model="u", ok=True,
                           latency_ms=ms, prompt_tokens=3, completion_tokens=4)
    metrics.record_call(model="xproc", ok=True, latency_ms=ms, prompt_tokens=3, completion_tokens=4)
metrics.flush_sync()
"""


@pytest.mark.redis
def test_metrics_from_another_process_are_merged_through_redis():
    import os
    import subprocess
    import sys

    from django.conf import settings as django_settings

    from agents.llm import metrics

    metrics.record_call(model="xproc", ok=False, latency_ms=50)
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "REDIS_URL": django_settings.REDIS_URL,
           "REDIS_KEY_PREFIX": django_settings.REDIS_KEY_PREFIX}
    done = subprocess.run([sys.executable, "-c", _CHILD], env=env, cwd=django_settings.BASE_DIR,
                          capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    snap = selectors.service_metrics()
    (model,) = [m for m in snap["models"] if m["model"] == "xproc"]
    assert model["requests"] == 4 and model["errors"] == 1 and model["completion_tokens"] == 12
    (dep,) = snap["deployments"]
    assert dep["deployment_id"] == 31337 and dep["provider"] == "p" and dep["p50_latency_ms"] in range(15, 26)


def test_an_unhealthy_deployment_recovers_after_a_quiet_spell(fake_upstream, settings, monkeypatch):
    from agents.llm import health

    settings.LLM_RETRY_BASE_DELAY = 0.001
    model = LLMModel.objects.create(name="rec", strategy="round_robin")
    add_fake_deployment(fake_upstream, model, "good")
    add_fake_deployment(fake_upstream, model, "flaky", max_retries=0)
    fake_upstream.configure("flaky", status=500)
    for _ in range(8):
        _call("rec")
    assert _rows()["flaky"].status == "unhealthy"
    fake_upstream.configure("flaky", status=200)
    monkeypatch.setattr(health, "RETRY_UNHEALTHY_AFTER", 0.0)  # the quiet spell has passed
    served = {_call("rec").upstream_model for _ in range(4)}
    assert "flaky" in served and _rows()["flaky"].status != "unhealthy"


def test_slow_deployment_is_degraded_but_still_served(fake_upstream, settings):
    settings.LLM_SLOW_LATENCY_MS = 100
    make_fake_model(fake_upstream, "slowish", upstream_model="sl")
    fake_upstream.configure("sl", tokens=2, latency=0.15)
    for _ in range(4):
        assert _call("slowish").upstream_model == "sl"
    row = _rows()["sl"]
    assert row.status == "degraded" and row.error_rate == 0 and row.response_time_ms >= 100
    assert selectors.service_health()["status"] == "degraded"


def test_a_call_that_falls_back_counts_once_in_the_summary(fake_upstream, settings):
    settings.LLM_RETRY_BASE_DELAY = 0.001
    make_fake_model(fake_upstream, "prim", upstream_model="p")
    make_fake_model(fake_upstream, "back", upstream_model="b")
    fake_upstream.configure("p", status=500)
    assert _call("prim", fallback_model="back").fallback
    _call("back")
    with pytest.raises(LLMError):
        _call("prim")
    snap = selectors.service_metrics()
    models = {m["model"]: m for m in snap["models"]}
    assert models["prim"]["requests"] == 2 and models["prim"]["errors"] == 2  # per model: the primary failed twice
    assert models["back"]["successes"] == 2
    summary = snap["summary"]
    assert summary["total_requests"] == 3 and summary["successes"] == 2 and summary["errors"] == 1
    assert summary["error_rate"] == round(1 / 3, 4)
