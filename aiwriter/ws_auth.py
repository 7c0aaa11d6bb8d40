"""Websocket auth: a Django session cookie or an `Authorization: Bearer` header."""

from __future__ import annotations

from importlib import import_module
from types import SimpleNamespace

from channels.auth import AuthMiddleware
from channels.db import database_sync_to_async
from channels.sessions import CookieMiddleware, SessionMiddleware
from django.conf import settings
from django.contrib import auth
from django.db.models import Q
from django.utils import timezone

from usage.authentication import bearer_token, resolve_api_key
from usage.models import ApiKey


@database_sync_to_async
def _user_for_key(raw_key: str):
    api_key = resolve_api_key(raw_key)
    return (api_key.user, api_key) if api_key else (None, None)


class _BearerOrSessionAuth(AuthMiddleware):
    async def resolve_scope(self, scope):
        headers = dict(scope.get("headers") or [])
        raw = bearer_token(headers.get(b"authorization", b"").decode("latin-1"))
        if raw:
            user, api_key = await _user_for_key(raw)
            if user is not None:
                scope["user"]._wrapped = user
                scope["api_key"] = api_key
                return
        await super().resolve_scope(scope)


def WebsocketAuthMiddleware(inner):  # noqa: N802 - mirrors channels.auth.AuthMiddlewareStack
    return CookieMiddleware(SessionMiddleware(_BearerOrSessionAuth(inner)))


def credential_is_live(user, api_key: ApiKey | None, session) -> bool:
    """Whether the credential a socket opened with still holds, read from the database (not from the scope).

    A key: not revoked, not expired, its user active (one indexed query). A session: still stored and
    unexpired (not logged out), for the same user, active, with the same password (Django's own session
    check). So a revocation, an expiry, a deactivation or a logout made by any process is seen by the next
    frame of every socket, whatever process holds it.
    """
    if api_key is not None:
        return ApiKey.objects.filter(
            Q(expires_at__isnull=True) | Q(expires_at__gt=timezone.now()),
            pk=api_key.pk, revoked_at__isnull=True, user__is_active=True,
        ).exists()
    session_key = getattr(session, "session_key", None)
    if not session_key or user is None:
        return False
    store = import_module(settings.SESSION_ENGINE).SessionStore(session_key=session_key)
    current = auth.get_user(SimpleNamespace(session=store))  # type: ignore[arg-type]  # AnonymousUser unless the session still holds
    return current.is_authenticated and current.pk == user.pk
