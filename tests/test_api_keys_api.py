"""/api/keys/: a user's own API keys; the raw key is shown once; another user's key is a 404."""

from datetime import timedelta

import pytest
from django.utils import timezone

from tests.factories import make_api_key, make_user
from usage.models import ApiKey

pytestmark = pytest.mark.django_db


def test_create_shows_the_raw_key_once_and_it_works(api_client):
    alice = make_user("alice")
    api_client.force_authenticate(alice)
    expires = (timezone.now() + timedelta(days=30)).isoformat()
    created = api_client.post("/api/keys/", {"name": "laptop", "expires_at": expires}, format="json").json()
    assert created["key"].startswith("aiw_") and created["name"] == "laptop" and created["expires_at"]
    listed = api_client.get("/api/keys/").json()
    assert [k["id"] for k in listed] == [created["id"]] and "key" not in listed[0]
    api_client.force_authenticate(None)
    me = api_client.get("/api/me/", HTTP_AUTHORIZATION=f"Bearer {created['key']}")
    assert me.json()["username"] == "alice"


def test_delete_revokes(api_client):
    alice = make_user()
    key, raw = make_api_key(alice)
    api_client.force_authenticate(alice)
    assert api_client.delete(f"/api/keys/{key.pk}/").status_code == 204
    assert ApiKey.objects.get(pk=key.pk).revoked_at is not None
    api_client.force_authenticate(None)
    assert api_client.get("/api/me/", HTTP_AUTHORIZATION=f"Bearer {raw}").status_code == 401


def test_bob_cannot_see_or_revoke_alices_key(api_client):
    alice, bob = make_user(), make_user()
    key, _ = make_api_key(alice)
    api_client.force_authenticate(bob)
    assert api_client.get("/api/keys/").json() == []
    response = api_client.delete(f"/api/keys/{key.pk}/")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    assert ApiKey.objects.get(pk=key.pk).revoked_at is None


def test_anonymous_is_401(api_client):
    assert api_client.get("/api/keys/").status_code == 401
