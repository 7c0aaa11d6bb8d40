"""Provider keys in the admin: shown as ••••last4 at most, write-only, kept when the field is left empty."""

from __future__ import annotations

import pytest
from django.urls import reverse

from agents.models import Provider
from tests.factories import make_provider
from tests.fixtures_web import form_data

pytestmark = pytest.mark.django_db

SECRET = "sk-live-very-secret-key-1234"


def test_changelist_shows_only_the_last_four(operator_client):
    make_provider("openai-main", kind="openai", base_url="https://api.example.com/v1", api_key=SECRET)
    response = operator_client.get(reverse("admin:agents_provider_changelist"))
    assert response.status_code == 200
    assert "••••1234" in response.content.decode()
    assert SECRET.encode() not in response.content
    assert b"very-secret" not in response.content


def test_change_page_never_renders_the_stored_key(operator_client):
    provider = make_provider("openai-main", kind="openai", base_url="https://api.example.com/v1", api_key=SECRET)
    response = operator_client.get(reverse("admin:agents_provider_change", args=[provider.pk]))
    body = response.content.decode()
    assert "••••1234" in body
    assert SECRET not in body
    assert 'type="password"' in body


def _save(client, provider, **changes):
    url = reverse("admin:agents_provider_change", args=[provider.pk])
    data = form_data(client.get(url).content, "provider_form")
    data.update(changes)
    response = client.post(url, data)
    assert response.status_code == 302, response.content.decode()[:3000]
    provider.refresh_from_db()
    return provider


def test_saving_with_the_key_field_empty_keeps_the_key(operator_client):
    provider = make_provider("p1", kind="openai", base_url="https://api.example.com/v1", api_key=SECRET)
    provider = _save(operator_client, provider, weight="5")
    assert provider.weight == 5
    assert provider.api_key == SECRET


def test_a_new_key_replaces_the_old_one(operator_client):
    provider = make_provider("p1", kind="openai", base_url="https://api.example.com/v1", api_key=SECRET)
    provider = _save(operator_client, provider, new_api_key="sk-new-key-9876")
    assert provider.api_key == "sk-new-key-9876"
    assert provider.masked_api_key == "••••9876"


def test_the_key_can_be_removed(operator_client):
    provider = make_provider("p1", kind="openai", base_url="https://api.example.com/v1", api_key=SECRET)
    provider = _save(operator_client, provider, clear_api_key="on")
    assert not provider.api_key


def test_adding_a_provider_stores_its_key_encrypted(operator_client):
    data = form_data(operator_client.get(reverse("admin:agents_provider_add")).content, "provider_form")
    data.update(name="new-upstream", kind="openai", base_url="https://llm.example.com/v1", new_api_key=SECRET)
    response = operator_client.post(reverse("admin:agents_provider_add"), data)
    assert response.status_code == 302
    provider = Provider.objects.get(name="new-upstream")
    assert provider.api_key == SECRET
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT api_key FROM agents_provider WHERE id = %s", [provider.pk])
        stored = cursor.fetchone()[0]
    assert SECRET not in stored
    # And the page after saving still doesn't show it.
    page = operator_client.get(reverse("admin:agents_provider_change", args=[provider.pk]))
    assert SECRET.encode() not in page.content


def test_the_key_appears_on_no_admin_page(operator_client, fake_upstream):
    from django.contrib import admin

    from tests.factories import make_agent, make_fake_model

    model = make_fake_model(fake_upstream, "secret-model", api_key=SECRET)
    agent = make_agent("writer", model=model)
    for action in ("route", "preview", "run"):
        operator_client.post(reverse("admin:agents_agent_debug", args=[agent.pk]), {"action": action, "message": "x"})
    urls = [reverse("admin-dashboard"), reverse("admin:agents_agent_debug", args=[agent.pk]),
            "/admin/autocomplete/?app_label=agents&model_name=deployment&field_name=provider&term=prov"]
    for model_class in admin.site._registry:
        opts = model_class._meta
        if opts.app_label not in {"agents", "usage", "conversations"}:
            continue
        urls.append(reverse(f"admin:{opts.app_label}_{opts.model_name}_changelist"))
        urls += [reverse(f"admin:{opts.app_label}_{opts.model_name}_change", args=[pk])
                 for pk in model_class._default_manager.values_list("pk", flat=True)[:5]]
    for url in urls:
        response = operator_client.get(url)
        assert response.status_code == 200, url
        assert SECRET.encode() not in response.content, url
        assert SECRET[-12:].encode() not in response.content, url
