from datetime import timedelta

import pytest
from django.core.management import call_command
from django.utils import timezone

from tests.factories import make_api_key, make_user
from usage.billing.keys import revoke_api_key
from usage.models import ApiKey

pytestmark = pytest.mark.django_db


def test_no_credentials_is_401_json_not_redirect(api_client):
    response = api_client.get("/api/me/")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "not_authenticated"
    assert response["WWW-Authenticate"] == "Bearer"


def test_key_authenticates_exactly_its_user(api_client):
    alice, bob = make_user("alice"), make_user("bob")
    _, alice_key = make_api_key(alice)
    make_api_key(bob)
    response = api_client.get("/api/me/", HTTP_AUTHORIZATION=f"Bearer {alice_key}")
    assert response.status_code == 200
    assert response.json()["username"] == "alice"


def test_key_is_stored_hashed_with_recognisable_prefix():
    api_key, raw = make_api_key()
    assert raw.startswith("aiw_") and api_key.prefix == raw[:12]
    stored = ApiKey.objects.get(pk=api_key.pk)
    assert raw not in (stored.key_hash, stored.prefix) and stored.key_hash == ApiKey.hash_key(raw)


def test_revoked_key_is_401(api_client):
    api_key, raw = make_api_key()
    revoke_api_key(api_key=api_key)
    response = api_client.get("/api/me/", HTTP_AUTHORIZATION=f"Bearer {raw}")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "authentication_failed"


def test_expired_key_is_401(api_client):
    _, raw = make_api_key(expires_at=timezone.now() - timedelta(seconds=1))
    assert api_client.get("/api/me/", HTTP_AUTHORIZATION=f"Bearer {raw}").status_code == 401


def test_unknown_or_malformed_key_is_401(api_client):
    assert api_client.get("/api/me/", HTTP_AUTHORIZATION="Bearer aiw_nope").status_code == 401
    assert api_client.get("/api/me/", HTTP_AUTHORIZATION="Basic xyz").status_code == 401


def test_session_login_works(client):
    make_user("carol", password="pw-123456")
    client.login(username="carol", password="pw-123456")
    assert client.get("/api/me/").json()["username"] == "carol"


def test_last_used_is_recorded(api_client):
    api_key, raw = make_api_key()
    api_client.get("/api/me/", HTTP_AUTHORIZATION=f"Bearer {raw}")
    api_key.refresh_from_db()
    assert api_key.last_used_at is not None


def test_create_api_key_command_prints_only_the_key(capsys):
    call_command("create_api_key", "dave", "--name", "ci", "--staff")
    out = capsys.readouterr().out.strip()
    assert out.startswith("aiw_") and "\n" not in out
    key = ApiKey.objects.get(key_hash=ApiKey.hash_key(out))
    assert key.user.username == "dave" and key.user.is_staff and key.name == "ci"
