"""The people's pages: chat page, usage page, login (Django test client)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from django.urls import reverse

from tests.factories import make_agent, make_user

pytestmark = pytest.mark.django_db


def test_chat_page_needs_login(client):
    response = client.get("/")
    assert response.status_code == 302
    assert response["Location"].startswith("/accounts/login/?next=/")


def test_account_page_needs_login(client):
    response = client.get("/account/")
    assert response.status_code == 302
    assert response["Location"].startswith("/accounts/login/")


def test_login_page_renders(client):
    response = client.get("/accounts/login/")
    assert response.status_code == 200
    assert b'name="username"' in response.content
    assert b"csrfmiddlewaretoken" in response.content


def test_login_then_chat_page(client):
    make_user("alice")
    response = client.post("/accounts/login/", {"username": "alice", "password": "pw-123456", "next": "/"})
    assert response.status_code == 302
    assert response["Location"] == "/"
    assert client.get("/").status_code == 200


def test_wrong_password_shows_error(client):
    make_user("alice")
    response = client.post("/accounts/login/", {"username": "alice", "password": "nope"})
    assert response.status_code == 200
    assert b"form-error" in response.content


def test_login_throttled_after_repeated_failures(client):
    make_user("alice")
    for _ in range(5):
        assert client.post("/accounts/login/", {"username": "alice", "password": "nope"}).status_code == 200
    response = client.post("/accounts/login/", {"username": "alice", "password": "pw-123456"})
    assert response.status_code == 429
    assert b"Too many failed logins" in response.content
    assert "_auth_user_id" not in client.session


def test_admin_login_is_throttled_too(client):
    make_user("root", staff=True)
    for _ in range(5):
        assert client.post("/admin/login/", {"username": "root", "password": "nope"}).status_code == 200
    response = client.post("/admin/login/", {"username": "root", "password": "pw-123456"})
    assert response.status_code == 429
    assert "_auth_user_id" not in client.session


def test_a_successful_login_clears_the_count(client):
    make_user("alice")
    for _ in range(4):
        client.post("/accounts/login/", {"username": "alice", "password": "nope"})
    assert client.post("/accounts/login/", {"username": "alice", "password": "pw-123456"}).status_code == 302
    client.logout()
    for _ in range(4):
        client.post("/accounts/login/", {"username": "alice", "password": "nope"})
    assert client.post("/accounts/login/", {"username": "alice", "password": "pw-123456"}).status_code == 302


def test_throttle_is_per_username(client):
    make_user("alice")
    make_user("bob")
    for _ in range(5):
        client.post("/accounts/login/", {"username": "alice", "password": "nope"})
    response = client.post("/accounts/login/", {"username": "bob", "password": "pw-123456"})
    assert response.status_code == 302


def test_logout_is_a_post(client):
    client.force_login(make_user("alice"))
    response = client.post("/accounts/logout/")
    assert response.status_code == 302
    assert client.get("/").status_code == 302


def _agents_json(response) -> list[dict]:
    match = re.search(rb'<script id="agents-data" type="application/json">(.*?)</script>', response.content, re.S)
    assert match, "the chat page carries its agents as JSON"
    return json.loads(match.group(1))


def test_chat_page_lists_enabled_agents_only(client):
    make_agent("writer", name="Writer")
    make_agent("hidden", name="Hidden", enabled=False)
    client.force_login(make_user("alice"))
    response = client.get("/")
    assert response.status_code == 200
    assert _agents_json(response) == [{"slug": "writer", "name": "Writer"}]
    assert b'<option value="writer">Writer</option>' in response.content
    assert b"js/chat.js" in response.content
    assert "csrftoken" in response.cookies


def test_agent_name_with_script_is_escaped(client):
    make_agent("evil", name="<script>alert(1)</script>")
    client.force_login(make_user("alice"))
    response = client.get("/")
    assert b"<script>alert(1)</script>" not in response.content
    assert _agents_json(response)[0]["name"] == "<script>alert(1)</script>"


def test_account_page_renders(client):
    client.force_login(make_user("alice"))
    response = client.get(reverse("account"))
    assert response.status_code == 200
    for marker in (b'id="balance"', b'id="quota-bars"', b'id="spend-chart"', b'id="key-form"', b"js/account.js"):
        assert marker in response.content


def test_admin_link_only_for_staff(client):
    client.force_login(make_user("alice"))
    assert b'href="/admin/"' not in client.get("/").content
    client.force_login(make_user("root", staff=True))
    assert b'href="/admin/"' in client.get("/").content


@pytest.mark.parametrize("path", ["/static/js/chat.js", "/static/js/markdown.js", "/static/js/socket.js",
                                  "/static/js/api.js", "/static/js/account.js", "/static/js/svgchart.js",
                                  "/static/css/app.css"])
def test_static_files_are_served(client, path):
    response = client.get(path)
    assert response.status_code == 200
    body = b"".join(response.streaming_content) if response.streaming else response.content
    assert b"cdn" not in body.lower() and b"https://" not in body  # works with no internet


def test_no_page_loads_anything_from_elsewhere():
    """No CDN, no build step: templates and static files only reference our own paths."""
    root = Path(__file__).resolve().parent.parent
    external = re.compile(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//|@import\s+(?:url\()?["']?(?:https?:)?//"""
                          r"""|url\(\s*["']?(?:https?:)?//|\bimport\b[^;\n]*?from\s*["'](?:https?:)?//""", re.I)
    # static/vendor/ is third-party code served as published (static/vendor/README.md); it builds URL strings
    # (marked's autolinks) without loading them. The browser tests check that no page fetches from elsewhere.
    files = [f for f in (*root.glob("templates/**/*.html"), *root.glob("static/**/*.js"), *root.glob("static/**/*.css"))
             if "vendor" not in f.relative_to(root).parts]
    assert len(files) > 10
    offenders = [f"{f.relative_to(root)}: {m.group(0)}" for f in files for m in external.finditer(f.read_text())]
    assert offenders == []
    for f in root.glob("static/js/*.js"):  # plain modules the browser loads as they are: no bundler syntax
        text = f.read_text()
        assert "require(" not in text and not re.search(r"""\bfrom\s+["'](?![./])""", text), f.name
