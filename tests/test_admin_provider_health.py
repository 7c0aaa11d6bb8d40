"""A provider's admin page: live health of its deployments and a "Test connection" button (one probe, stored like
probe_deployments'); health read from the shared store survives a restart (issue 14, admin)."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.urls import reverse

from agents.llm import breaker, health
from agents.models import Deployment
from tests.factories import make_fake_model, make_provider, make_user
from usage.models import UsageRecord

pytestmark = pytest.mark.django_db


def _restart() -> None:
    """What a process restart loses: the in-memory traffic windows and breakers."""
    health.reset()
    breaker.reset()


def test_provider_page_has_a_csrf_protected_test_connection_button(operator_client, fake_upstream):
    model = make_fake_model(fake_upstream, "probe-model")
    provider = model.deployments.get().provider
    body = operator_client.get(reverse("admin:agents_provider_change", args=[provider.pk])).content.decode()
    action = reverse("admin:agents_provider_test_connection", args=[provider.pk])
    form = body.split(f'<form method="post" action="{action}"')[1].split("</form>")[0]
    assert 'name="csrfmiddlewaretoken"' in form and 'id="test-connection"' in form
    assert "<script" not in form


def test_test_connection_probes_once_and_stores_the_verdict(operator_client, fake_upstream):
    model = make_fake_model(fake_upstream, "probe-model")
    deployment = model.deployments.get()
    url = reverse("admin:agents_provider_test_connection", args=[deployment.provider.pk])
    response = operator_client.post(url, follow=True)
    assert response.status_code == 200
    body = response.content.decode()
    assert 'class="success"' in body and "Test connection to" in body and "healthy" in body
    assert len(fake_upstream.requests_for("probe-model")) == 1
    deployment.refresh_from_db()
    assert deployment.health_status == "healthy" and deployment.last_check_at is not None
    # The page shows it as the deployment's health.
    assert '<span class="aiw-health aiw-health-healthy">healthy</span>' in body


def test_a_failing_upstream_is_reported_as_an_error_message(operator_client, fake_upstream):
    model = make_fake_model(fake_upstream, "down-model")
    fake_upstream.configure("down-model", status=500)
    provider = model.deployments.get().provider
    provider.max_retries = 0
    provider.save()
    response = operator_client.post(reverse("admin:agents_provider_test_connection", args=[provider.pk]), follow=True)
    body = response.content.decode()
    assert 'class="error"' in body and "failed" in body
    assert Deployment.objects.get().health_status == "unhealthy"


def test_test_connection_without_deployments_says_so(operator_client):
    provider = make_provider("empty")
    response = operator_client.post(reverse("admin:agents_provider_test_connection", args=[provider.pk]), follow=True)
    assert "has no deployment to probe" in response.content.decode()


def test_test_connection_is_post_only(operator_client):
    provider = make_provider("empty")
    assert operator_client.get(reverse("admin:agents_provider_test_connection", args=[provider.pk])).status_code == 403


def test_health_from_recent_traffic_survives_a_restart(operator_client, fake_upstream):
    model = make_fake_model(fake_upstream, "busy-model")
    deployment = model.deployments.get()
    user = make_user("alice")
    for _ in range(5):
        UsageRecord.objects.create(user=user, provider=deployment.provider.name, model=model.name,
                                   upstream_model=deployment.upstream_model, status="error",
                                   error_code="upstream_error", cost=Decimal("0"), latency_ms=50)
    _restart()
    assert Deployment.objects.get().health_status == "unknown"  # never probed
    body = operator_client.get(reverse("admin-dashboard")).content.decode()
    row = body.split('<tr class="deployment">')[1].split("</tr>")[0]
    assert '<span class="state state-unhealthy">unhealthy</span>' in row
    assert "upstream_error" in row and "100%" in row
    page = operator_client.get(reverse("admin:agents_provider_change", args=[deployment.provider.pk])).content.decode()
    assert '<span class="aiw-health aiw-health-unhealthy">unhealthy</span>' in page


def test_a_stored_probe_survives_a_restart(operator_client, fake_upstream):
    model = make_fake_model(fake_upstream, "probed-model")
    provider = model.deployments.get().provider
    operator_client.post(reverse("admin:agents_provider_test_connection", args=[provider.pk]))
    _restart()
    body = operator_client.get(reverse("admin-dashboard")).content.decode()
    row = body.split('<tr class="deployment">')[1].split("</tr>")[0]
    assert '<span class="state state-healthy">healthy</span>' in row


@pytest.mark.redis
def test_a_breaker_opened_by_another_process_shows_on_the_provider_page(operator_client, fake_upstream):
    model = make_fake_model(fake_upstream, "tripped-model")
    deployment = model.deployments.get()
    breaker.get(deployment.pk, threshold=1).failure()  # opened by the serving process...
    _restart()  # ...seen from a process that never called it (a restart, or the admin's own process)
    page = operator_client.get(reverse("admin:agents_provider_change", args=[deployment.provider.pk])).content.decode()
    assert '<span class="aiw-health aiw-health-unhealthy">unhealthy</span>' in page
    assert '<span class="aiw-breaker aiw-breaker-open">open</span>' in page
    body = operator_client.get(reverse("admin-dashboard")).content.decode()
    row = body.split('<tr class="deployment">')[1].split("</tr>")[0]
    assert '<span class="state state-open">open</span>' in row
