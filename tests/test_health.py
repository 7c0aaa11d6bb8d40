import pytest
from django.db import connections
from django.test import override_settings

from aiwriter import health
from tests.fixtures_faults import free_port

pytestmark = pytest.mark.django_db


def test_healthz(client):
    assert client.get("/healthz").json() == {"status": "ok"}


def test_readyz_checks_database(client):
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json()["checks"]["database"] == "ok"


def test_readyz_reports_unreachable_redis(client):
    from aiwriter import redis as redis_module

    redis_module.get_redis.cache_clear()
    try:
        with override_settings(REDIS_URL="redis://127.0.0.1:1/0"):
            response = client.get("/readyz")
    finally:
        redis_module.get_redis.cache_clear()
    assert response.status_code == 503
    body = response.json()
    assert body["checks"]["redis"].startswith("error") and body["error"]["code"] == "not_ready"


def test_request_id_is_echoed(client):
    response = client.get("/healthz", HTTP_X_REQUEST_ID="abc-123")
    assert response["X-Request-ID"] == "abc-123"
    assert len(client.get("/healthz")["X-Request-ID"]) == 32


def test_unknown_api_path_is_json_404(client):
    response = client.get("/api/does-not-exist/")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


@override_settings(DEBUG=True)  # `make run`: Django's HTML debug page unless the path is routed
def test_unknown_api_path_is_json_404_with_debug_on(client):
    for method, path in (("get", "/api/does-not-exist/"), ("post", "/api/nope"), ("get", "/api/conversations/9/x/")):
        response = getattr(client, method)(path)
        assert response.status_code == 404, path
        assert response["Content-Type"] == "application/json", path
        assert response.json()["error"]["code"] == "not_found", path


def test_an_api_path_missing_its_slash_still_redirects(client):
    response = client.get("/api/me")
    assert response.status_code == 301 and response["Location"] == "/api/me/"


def test_favicon_is_served_and_linked(client, django_user_model):
    response = client.get("/favicon.ico")
    assert response.status_code == 200 and response["Content-Type"] == "image/x-icon"
    assert b"".join(response).startswith(b"\x00\x00\x01\x00")  # an ICO header
    client.force_login(django_user_model.objects.create_user("fav"))
    assert 'rel="icon"' in client.get("/").content.decode()


def test_readyz_reports_unreachable_database(client, monkeypatch):
    """A database that refuses connections: 503, naming the database, without the driver's message (host, port)."""
    broken = connections.create_connection("default")  # a fresh connection with the same settings...
    port = free_port()
    if broken.vendor == "sqlite":  # ...pointed at a database that cannot be opened
        broken.settings_dict = {**broken.settings_dict, "NAME": f"/nonexistent-{port}/db.sqlite3"}
    else:  # ...or at a port where nothing listens
        broken.settings_dict = {**broken.settings_dict, "HOST": "127.0.0.1", "PORT": port}
    monkeypatch.setattr(health, "connection", broken)
    try:
        response = client.get("/readyz")
    finally:
        broken.close()
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert body["checks"]["database"] == "error: OperationalError"
    assert body["error"]["code"] == "not_ready" and body["error"]["retryable"] is True
    assert "database" in body["error"]["message"]
    assert str(port) not in response.content.decode()
