"""A provider's api_key never shows up in an API response, an admin page or a log line, even at DEBUG.

One walk through everything that touches a provider: the staff API (create, read, update, a refused write),
the admin (add, a form re-rendered with errors, list, change, history, the model page), calls through the
service layer (success, stream, 401, 500, the probe), the health and metrics reports. Every log record of
every logger is captured at DEBUG with the project's JSON formatter, SQL included (debug cursor on).
"""

import io

import pytest
from asgiref.sync import async_to_sync
from django.contrib import admin
from django.core.management import call_command
from django.urls import reverse

from agents.llm import service
from agents.llm.types import ChatRequest, LLMError
from agents.models import Deployment, LLMModel, Provider
from tests.factories import make_user
from tests.fixtures_web import form_data

pytestmark = pytest.mark.django_db

SECRET = "sk-live-Zq8TOPSECRETvalue-4242abcd"
MIDDLE = "TOPSECRET"  # any fragment of the key


def _clean(text: str | bytes) -> None:
    if isinstance(text, bytes):
        text = text.decode()
    assert SECRET not in text and MIDDLE not in text


def test_key_never_leaks_anywhere(api_client, operator_client, fake_upstream, debug_log):
    staff = make_user(staff=True)
    api_client.force_authenticate(staff)
    bodies: list[bytes] = []

    # Staff API.
    body = {"name": "leaky", "kind": "openai", "base_url": fake_upstream.base_url, "api_key": SECRET, "weight": 1,
            "enabled": True, "rpm": None, "tpm": None, "max_concurrency": None, "timeout": 5.0, "max_retries": 0}
    created = api_client.post("/api/providers/", body, format="json")
    assert created.status_code == 201
    refused = api_client.post("/api/providers/", {**body, "kind": "nope"}, format="json")
    assert refused.status_code == 400
    bodies += [created.content, refused.content, api_client.get("/api/providers/").content,
               api_client.get("/api/providers/leaky/").content,
               api_client.patch("/api/providers/leaky/", {"weight": 2}, format="json").content]
    api_client.post("/api/models/", {"name": "leak-m", "strategy": "round_robin", "deployments": [
        {"provider": "leaky", "upstream_model": "leak", "weight": 1}]}, format="json")
    assert Provider.objects.get(name="leaky").api_key == SECRET

    # Calls through the provider: success, stream, refused key, server error, the probe.
    fake_upstream.configure("leak", tokens=3)
    async_to_sync(service.complete)(ChatRequest(model="leak-m", messages=[{"role": "user", "content": "x"}]))

    async def _stream():
        return [i async for i in service.stream(ChatRequest(model="leak-m", messages=[{"role": "user",
                                                                                          "content": "y"}]))]
    async_to_sync(_stream)()
    errors = []
    for status in (401, 500):
        fake_upstream.configure("leak", status=status)
        with pytest.raises(LLMError) as info:
            async_to_sync(service.complete)(ChatRequest(model="leak-m", messages=[{"role": "user", "content": "z"}]))
        errors.append(info.value)
    call_command("probe_deployments", "--timeout", "2", stdout=io.StringIO())
    assert all(r["authorization"] == f"Bearer {SECRET}" for r in fake_upstream.requests)  # it did go upstream
    for exc in errors:
        _clean(str(exc))
        _clean(repr(exc.__dict__))

    # Reports.
    bodies += [api_client.get("/api/ai-services/health/").content, api_client.get("/api/ai-services/metrics/").content]

    # Admin: add (with a form error first), list, change, history, the model and deployment pages.
    add_url = reverse("admin:agents_provider_add")
    data = form_data(operator_client.get(add_url).content, "provider_form")
    data.update(name="admin-made", kind="openai", base_url="https://llm.example.com/v1", new_api_key=SECRET)
    rejected = operator_client.post(add_url, {**data, "weight": "not-a-number"})
    assert rejected.status_code == 200  # re-rendered with the error: the password field stays empty
    assert operator_client.post(add_url, data).status_code == 302
    provider = Provider.objects.get(name="leaky")
    model = LLMModel.objects.get(name="leak-m")
    deployment = Deployment.objects.get(model=model)
    for url in (reverse("admin:agents_provider_changelist"),
                reverse("admin:agents_provider_change", args=[provider.pk]),
                reverse("admin:agents_provider_history", args=[provider.pk]),
                reverse("admin:agents_llmmodel_change", args=[model.pk]),
                reverse("admin:agents_llmmodel_changelist"),
                reverse("admin:index")):
        response = operator_client.get(url)
        assert response.status_code == 200, url
        bodies.append(response.content)
    bodies.append(rejected.content)
    if admin.site.is_registered(Deployment):
        bodies.append(operator_client.get(reverse("admin:agents_deployment_change", args=[deployment.pk])).content)

    for content in bodies:
        _clean(content)
    logged = debug_log.getvalue()
    assert '"level": "DEBUG"' in logged and "agents_provider" in logged  # SQL on providers was logged...
    _clean(logged)  # ...with the key encrypted, and nothing else carried it either
