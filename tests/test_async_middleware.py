"""The middleware chain stays async: one sync-only middleware would serve requests one at a time."""

from __future__ import annotations

import pytest
from django.conf import settings
from django.utils.module_loading import import_string


def test_every_middleware_is_async_capable():
    sync_only = [name for name in settings.MIDDLEWARE if not getattr(import_string(name), "async_capable", False)]
    assert sync_only == []


@pytest.mark.django_db
async def test_static_files_are_still_served(async_client):
    response = await async_client.get("/static/admin/css/base.css")
    assert response.status_code == 200
    assert response.streaming  # WhiteNoise streams the file
    assert response["Content-Type"].startswith("text/css")


@pytest.mark.django_db
async def test_other_paths_reach_the_views(async_client):
    response = await async_client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_deploy_check_still_wants_the_security_middleware(settings):
    from aiwriter.checks import security_middleware

    assert security_middleware() == []
    settings.MIDDLEWARE = [m for m in settings.MIDDLEWARE if "Csrf" not in m and "XFrame" not in m]
    assert [w.msg.split()[0] for w in security_middleware()] == [
        "django.middleware.clickjacking.XFrameOptionsMiddleware", "django.middleware.csrf.CsrfViewMiddleware"]


def _through_messages(view):
    from django.contrib.sessions.backends.cache import SessionStore
    from django.test import RequestFactory

    from aiwriter.asyncmw import MessageMiddleware

    request = RequestFactory().get("/")
    request.session = SessionStore()
    return request, MessageMiddleware(view)(request)


def test_messages_are_stored_only_when_a_view_uses_them(settings):
    from django.contrib import messages
    from django.http import HttpResponse

    settings.MESSAGE_STORAGE = "django.contrib.messages.storage.fallback.FallbackStorage"

    def adds(request):
        messages.info(request, "Saved.")
        return HttpResponse("ok")

    request, response = _through_messages(adds)
    assert response.cookies["messages"].value  # stored (signed) for the next page
    request, response = _through_messages(lambda request: HttpResponse("api"))
    assert "messages" not in response.cookies
    from django.utils.functional import empty

    assert request._messages._wrapped is empty  # never built: no signer, no session storage
    assert list(messages.get_messages(request)) == []  # still usable afterwards
