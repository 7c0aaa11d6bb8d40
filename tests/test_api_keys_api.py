"""/api/keys/: a user's own API keys; the raw key is shown once; another user's key is a 404."""

from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from tests.factories import make_api_key, make_model, make_user
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


# --- Keys are managed from a session, never with a key (issue 12, item 1) ---------------------------------------------

def _limited_key(user, model):
    """A key with every limit there is: one model, rpm, tpm, a budget, a project and an expiry."""
    key, raw = make_api_key(user, project="acme", expires_at=timezone.now() + timedelta(days=1))
    key.allowed_models.set([model])
    ApiKey.objects.filter(pk=key.pk).update(rpm=2, tpm=100, monthly_budget=Decimal("1"))
    return key, raw


def _refused(response) -> bool:
    return response.status_code == 403 and response.json()["error"]["code"] == "key_management_requires_session"


def test_a_restricted_key_cannot_mint_list_or_revoke_keys(api_client):
    alice = make_user("alice")
    limited, raw = _limited_key(alice, make_model("cheap"))
    other, _ = make_api_key(alice, name="laptop")
    api_client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    assert _refused(api_client.post("/api/keys/", {"name": "escape"}, format="json"))
    assert _refused(api_client.get("/api/keys/"))
    assert _refused(api_client.delete(f"/api/keys/{other.pk}/"))
    assert _refused(api_client.delete(f"/api/keys/{limited.pk}/"))
    # Nothing was made or revoked.
    assert set(ApiKey.objects.values_list("pk", flat=True)) == {limited.pk, other.pk}
    assert not ApiKey.objects.filter(revoked_at__isnull=False).exists()
    # The key itself still works for what it is for.
    assert api_client.get("/api/me/").json()["username"] == "alice"


def test_an_unrestricted_key_and_a_staff_key_cannot_manage_keys_either(api_client):
    for user in (make_user(), make_user(staff=True)):
        _, raw = make_api_key(user)
        api_client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
        assert _refused(api_client.post("/api/keys/", {"name": "k"}, format="json"))
        assert _refused(api_client.get("/api/keys/"))
    assert ApiKey.objects.count() == 2


def test_a_signed_in_session_manages_keys(client):
    alice = make_user("alice")
    client.force_login(alice)
    created = client.post("/api/keys/", {"name": "ci"}, content_type="application/json")
    assert created.status_code == 201
    assert [k["name"] for k in client.get("/api/keys/").json()] == ["ci"]
    assert client.delete(f"/api/keys/{created.json()['id']}/").status_code == 204
