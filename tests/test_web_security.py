"""The web layer's defences: CSRF on session writes, security headers and CSP, and a user's API key kept secret.

- A write with the session cookie needs the CSRF token; a bearer key needs none (a browser never sends it
  cross-site by itself).
- Every response carries nosniff, Referrer-Policy, X-Frame-Options and Cross-Origin-Opener-Policy; HSTS
  under production settings; HTML pages a Content-Security-Policy that allows no inline script.
- A user's bearer key never appears in a response body nor in any log line, even at DEBUG with SQL logged,
  and is never forwarded to a provider.
"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import pytest
from asgiref.sync import async_to_sync
from django.conf import settings
from django.test import AsyncClient, Client, override_settings

from tests.factories import make_agent, make_api_key, make_fake_model, make_user
from tests.fixtures_openai import make_account
from tests.fixtures_web import browser_login
from usage.billing.keys import revoke_api_key
from usage.models import ApiKey

pytestmark = pytest.mark.django_db

MESSAGES = [{"role": "user", "content": "Hello"}]
V1_BODY = {"model": "leak-gpt", "messages": MESSAGES}


# --- CSRF -------------------------------------------------------------------------------------------------------------

@pytest.fixture
def csrf_client():
    """A client that checks CSRF as a browser's requests are checked, logged in by session, holding the token."""
    client = Client(enforce_csrf_checks=True)
    client.user = make_user()
    client.force_login(client.user)
    assert client.get("/account/").status_code == 200  # the page sets the csrftoken cookie (ensure_csrf_cookie)
    client.csrf_token = client.cookies["csrftoken"].value
    return client


def _json_post(client, path, body, **headers):
    return client.post(path, json.dumps(body), content_type="application/json", headers=headers)


def _refused_for_csrf(response) -> bool:
    error = response.json()["error"]
    return response.status_code == 403 and error["code"] == "permission_denied" and "CSRF" in error["message"]


def test_session_post_without_the_csrf_token_is_403(csrf_client):
    agent = make_agent()
    for path, body in (("/api/keys/", {"name": "laptop"}), ("/api/conversations/", {"agent": agent.slug})):
        assert _refused_for_csrf(_json_post(csrf_client, path, body)), path
        assert _refused_for_csrf(_json_post(csrf_client, path, body, **{"X-CSRFToken": "wrong" * 8})), path
    assert not ApiKey.objects.exists()


def test_session_post_with_the_csrf_token_succeeds(csrf_client):
    agent = make_agent()
    token = {"X-CSRFToken": csrf_client.csrf_token}
    assert _json_post(csrf_client, "/api/keys/", {"name": "laptop"}, **token).status_code == 201
    assert _json_post(csrf_client, "/api/conversations/", {"agent": agent.slug}, **token).status_code == 201


def test_session_delete_needs_the_csrf_token_too(csrf_client):
    key, _ = make_api_key(csrf_client.user)
    assert _refused_for_csrf(csrf_client.delete(f"/api/keys/{key.pk}/"))
    key.refresh_from_db()
    assert key.revoked_at is None
    accepted = csrf_client.delete(f"/api/keys/{key.pk}/", headers={"X-CSRFToken": csrf_client.csrf_token})
    assert accepted.status_code == 204


def test_bearer_key_writes_need_no_csrf_token():
    account = make_account()
    agent = make_agent()
    client = Client(enforce_csrf_checks=True)
    auth = {"Authorization": account.auth}
    assert _json_post(client, "/api/conversations/", {"agent": agent.slug}, **auth).status_code == 201
    assert _json_post(client, "/v1/chat/completions", {}, **auth).status_code == 400  # refused for the body only


# --- Security headers -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/accounts/login/", "/api/me/", "/v1/models", "/healthz", "/api/does-not-exist/"])
def test_every_response_carries_the_security_headers(client, path):
    response = client.get(path)
    assert response["X-Content-Type-Options"] == "nosniff"
    assert response["Referrer-Policy"] == "same-origin"
    assert response["X-Frame-Options"] in ("DENY", "SAMEORIGIN")
    assert response["Cross-Origin-Opener-Policy"] == "same-origin"
    assert "Strict-Transport-Security" not in response  # only over HTTPS, with SECURE_HSTS_SECONDS set


def test_hsts_and_https_redirect_under_production_settings():
    with override_settings(SECURE_HSTS_SECONDS=31_536_000, SECURE_HSTS_INCLUDE_SUBDOMAINS=True,
                           SECURE_HSTS_PRELOAD=True, SECURE_SSL_REDIRECT=True):
        client = Client()  # a new client, so the security middleware is built with these settings
        secure = client.get("/healthz", secure=True)
        plain = client.get("/healthz")
    assert secure.status_code == 200
    assert secure["Strict-Transport-Security"] == "max-age=31536000; includeSubDomains; preload"
    assert plain.status_code == 301 and plain["Location"] == "https://testserver/healthz"


def test_session_and_csrf_cookies_are_secure_and_the_session_cookie_http_only(client):
    make_user("carol")
    response = client.post("/accounts/login/", {"username": "carol", "password": "pw-123456"})
    assert response.status_code == 302
    session = response.cookies[settings.SESSION_COOKIE_NAME]
    assert session["httponly"] and session["secure"] and session["samesite"] == "Lax"
    page = client.get("/account/")
    assert page.cookies["csrftoken"]["secure"]


def test_html_pages_carry_a_content_security_policy_without_inline_script(client, operator):
    client.force_login(operator)
    for path in ("/", "/account/"):
        policy = client.get(path)["Content-Security-Policy"]
        assert policy == settings.CONTENT_SECURITY_POLICY
        assert "script-src 'self';" in policy and "style-src 'self';" in policy
        assert "frame-ancestors 'none'" in policy and "object-src 'none'" in policy
    for path in ("/admin/", "/admin/dashboard/"):
        policy = client.get(path)["Content-Security-Policy"]
        assert policy == settings.CONTENT_SECURITY_POLICY_ADMIN
        assert "script-src 'self';" in policy  # the admin may use inline styles, never inline scripts
    client.logout()
    assert client.get("/accounts/login/")["Content-Security-Policy"] == settings.CONTENT_SECURITY_POLICY


def test_json_responses_carry_no_content_security_policy(client):
    assert "Content-Security-Policy" not in client.get("/api/me/")
    assert "Content-Security-Policy" not in client.get("/healthz")


class _InlineFinder(HTMLParser):
    """Collects what a strict CSP would block in a page: inline scripts, event-handler and style attributes."""

    def __init__(self):
        super().__init__()
        self.blocked: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "script" and not a.get("src") and a.get("type") != "application/json":
            self.blocked.append("<script> without src")
        if tag == "style":
            self.blocked.append("<style>")
        self.blocked += [f"<{tag} {name}=…>" for name in a if name == "style" or name.startswith("on")]


def test_our_pages_need_nothing_the_policy_blocks(client):
    """Our own pages (not the admin) hold no inline script, style block, style or on* attribute."""
    agent = make_agent()
    client.force_login(make_user())
    pages = {path: client.get(path) for path in ("/", "/account/")}
    client.logout()
    pages["/accounts/login/"] = client.get("/accounts/login/")
    for path, response in pages.items():
        assert response.status_code == 200, path
        finder = _InlineFinder()
        finder.feed(response.content.decode())
        assert finder.blocked == [], path
    assert agent.name.encode() in pages["/"].content  # the chat page rendered its agents (a data block)


# --- The user's API key stays secret ------------------------------------------------------------------------------

@pytest.mark.django_db(transaction=True)
def test_bearer_key_never_leaks(fake_upstream, debug_log):
    account = make_account()
    raw = account.raw
    fragment = raw[len(account.key.prefix):][:16]  # past the prefix the key list shows on purpose
    make_agent("leak-agent", model=make_fake_model(fake_upstream, "leak-gpt"))
    fake_upstream.configure("leak-gpt", tokens=3)
    client = Client()
    auth = {"Authorization": account.auth}
    bodies: list[bytes] = []

    def call(method, path, body=None, *, expect, **headers):
        if body is None:
            response = getattr(client, method)(path, headers=headers)
        else:
            response = getattr(client, method)(path, json.dumps(body), content_type="application/json",
                                               headers=headers)
        assert response.status_code == expect, (path, response.status_code, response.content[:300])
        bodies.append(response.content)
        bodies.append(str(dict(response.headers)).encode())

    async def stream() -> bytes:  # an async view's stream is read by an async client
        response = await AsyncClient().post("/v1/chat/completions", {**V1_BODY, "stream": True},
                                            content_type="application/json", headers=auth)
        assert response.status_code == 200
        return b"".join([part async for part in response.streaming_content]) + str(dict(response.headers)).encode()

    # Successes: the REST API, a chat message, the writer, /v1 (plain and streamed).
    call("get", "/api/me/", expect=200, **auth)
    call("get", "/api/keys/", expect=403, **auth)  # keys are managed from a session, not with a key
    conversation = client.post("/api/conversations/", {"agent": "leak-agent"}, content_type="application/json",
                               headers=auth).json()
    call("post", f"/api/conversations/{conversation['id']}/messages/", {"content": "hi"}, expect=201, **auth)
    call("post", "/api/ai/generate-text/", {"prompt": "hello", "model": "leak-gpt"}, expect=200, **auth)
    call("post", "/v1/chat/completions", V1_BODY, expect=200, **auth)
    bodies.append(async_to_sync(stream)())
    call("get", "/v1/models", expect=200, **auth)
    # Errors with a good key: bad input, unknown model, the provider refusing or failing.
    call("post", "/api/conversations/", {"agent": "nope"}, expect=400, **auth)
    call("post", "/v1/chat/completions", {"model": "nope", "messages": MESSAGES}, expect=404, **auth)
    call("post", "/v1/chat/completions", {"messages": "x"}, expect=400, **auth)
    for status in (401, 500):
        fake_upstream.configure("leak-gpt", status=status)
        call("post", "/v1/chat/completions", V1_BODY, expect=502, **auth)
    # Refused keys: mistyped, malformed header, revoked.
    for header in (f"Bearer {raw}x", f"Bearer {raw[:-1]}", f"Token {raw}", f"Bearer {raw} {raw}"):
        call("get", "/api/me/", expect=401, Authorization=header)
        call("get", "/v1/models", expect=401, Authorization=header)
    revoke_api_key(api_key=account.key)
    call("get", "/api/me/", expect=401, **auth)
    call("post", "/v1/chat/completions", V1_BODY, expect=401, **auth)

    for content in bodies:
        text = content.decode()
        assert raw not in text and fragment not in text, text[:300]
    logged = debug_log.getvalue()
    assert '"level": "DEBUG"' in logged and "usage_apikey" in logged  # key lookups were logged, as SQL...
    assert raw not in logged and fragment not in logged  # ...by hash: the key itself is nowhere
    sent = [r["authorization"] for r in fake_upstream.requests]
    assert sent and all(raw not in value for value in sent)  # the provider gets the provider's key, never ours
    assert re.search(r"^Bearer sk-", sent[0])


# --- In a browser (last in the module: once Playwright has started in this thread, a sync test client can no
# longer call the async views here, see tests/fixtures_web.py `_chromium`) ---------------------------------------

@pytest.mark.browser
@pytest.mark.pg
@pytest.mark.timeout(90)
def test_pages_raise_no_csp_violation_in_a_browser(browser_page, web_server, operator, fake_upstream):
    """Chat (its websocket connects), the usage page, admin pages and the dashboard in chromium: no CSP report."""
    model = make_fake_model(fake_upstream, "csp-model")
    make_agent("writer", name="Writer", model=model)
    page = browser_page
    browser_login(page, web_server, "operator")
    page.wait_for_selector("#connection[data-state=open]")
    page.goto(f"{web_server}/account/")
    page.wait_for_selector("#key-rows td:text-is('No keys yet.')")  # the page's scripts ran and called the API
    page.goto(f"{web_server}/admin/")  # already signed in, as staff
    page.wait_for_selector("#aiw-dashboard-link")
    page.goto(f"{web_server}/admin/agents/llmmodel/{model.pk}/change/")  # a change form with inlines: admin JS
    page.wait_for_selector("#prices-group")
    page.goto(f"{web_server}/admin/dashboard/")
    page.wait_for_selector("#deployment-health")
    violations = [m for m in page.console_messages if "Content Security Policy" in m]
    assert violations == [], violations
