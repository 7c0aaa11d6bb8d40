"""Server-rendered pages for people: the chat page, their usage page, and login.

The pages are thin shells: the JavaScript modules in static/js/ talk to the REST API and the chat
websocket with the session cookie (and the CSRF token for writes).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from functools import wraps
from typing import Any

from django.conf import settings
from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.core.cache import cache
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.urls import include, path
from django.views.decorators.csrf import ensure_csrf_cookie

from agents.models import Agent
from aiwriter.clientaddr import client_address

logger = logging.getLogger(__name__)

# Login throttling, per window: failed logins for one username from one client address lock that pair out;
# for one username from anywhere lock the username out (an attacker rotating addresses); from one address for
# any usernames lock the address out (one address trying many accounts). The address is clientaddr's.
LOGIN_MAX_FAILURES = 5
LOGIN_MAX_FAILURES_PER_USERNAME = 10
LOGIN_MAX_FAILURES_PER_ADDRESS = 30
LOGIN_WINDOW_SECONDS = 15 * 60


def _enabled_agents() -> list[dict[str, str]]:
    return list(Agent.objects.filter(enabled=True, model__enabled=True).order_by("name").values("slug", "name"))


@login_required
@ensure_csrf_cookie
def chat(request: HttpRequest) -> HttpResponse:
    return render(request, "chat/index.html", {
        "agents": _enabled_agents(),
        "page_config": {"currency": settings.CURRENCY, "max_chars": settings.MAX_MESSAGE_CHARS,
                        "is_staff": request.user.is_staff},
    })


@login_required
@ensure_csrf_cookie
def account(request: HttpRequest) -> HttpResponse:
    return render(request, "account/index.html", {"page_config": {"currency": settings.CURRENCY}})


def _failure_counters(request: HttpRequest) -> dict[str, int]:
    """The cache keys counting this try's failures, each with its limit."""
    # Hashed: a cache key must not carry whatever the form was sent (spaces, control characters, any length).
    username = hashlib.sha256((request.POST.get("username") or "").strip().lower().encode()).hexdigest()[:32]
    address = client_address(request)
    return {
        f"login-failures:pair:{address}:{username}": LOGIN_MAX_FAILURES,
        f"login-failures:user:{username}": LOGIN_MAX_FAILURES_PER_USERNAME,
        f"login-failures:addr:{address}": LOGIN_MAX_FAILURES_PER_ADDRESS,
    }


def _count_failure(key: str) -> None:
    cache.add(key, 0, LOGIN_WINDOW_SECONDS)
    try:
        cache.incr(key)
    except ValueError:  # expired between add and incr
        cache.set(key, 1, LOGIN_WINDOW_SECONDS)


def throttle_logins(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """Wraps a login view: past a limit of failed tries (per address and username, per username, per address)
    refuse for a while (429).

    A POST answered with the form again (200) is a failed try; a redirect is a success and clears the counts
    of that username (not the address's: logging in to one's own account must not reset a spray from there).
    The counts live in the shared cache, so they hold across processes when REDIS_URL is set.
    """

    @wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if request.method != "POST":
            return view(request, *args, **kwargs)
        counters = _failure_counters(request)
        counts = cache.get_many(list(counters))
        if any(counts.get(key, 0) >= limit for key, limit in counters.items()):
            logger.warning("login throttled for address %s", client_address(request))
            return render(request, "registration/throttled.html", {"minutes": LOGIN_WINDOW_SECONDS // 60},
                          status=429)
        response = view(request, *args, **kwargs)
        if response.status_code == 200:
            for key in counters:
                _count_failure(key)
        elif response.status_code == 302:
            cache.delete_many([key for key in counters if not key.startswith("login-failures:addr:")])
        return response

    return wrapper


login_view = throttle_logins(auth_views.LoginView.as_view(template_name="registration/login.html",
                                                          redirect_authenticated_user=True))
admin_login_view = throttle_logins(admin.site.login)


def _dashboard(request: HttpRequest) -> HttpResponse:
    from aiwriter.dashboard import dashboard

    return dashboard(request)


# Included at the top of aiwriter/urls.py, so /admin/login/ and /admin/dashboard/ win over the admin's own routes.
urlpatterns = [
    path("", chat, name="chat"),
    path("account/", account, name="account"),
    path("accounts/login/", login_view, name="login"),
    path("admin/login/", admin_login_view),  # the admin's own login view, throttled the same way
    path("accounts/", include("django.contrib.auth.urls")),
    path("admin/dashboard/", _dashboard, name="admin-dashboard"),
]
