"""Websocket auth: a Django session cookie or an `Authorization: Bearer` header."""

from __future__ import annotations

from channels.auth import AuthMiddleware
from channels.db import database_sync_to_async
from channels.sessions import CookieMiddleware, SessionMiddleware

from usage.authentication import bearer_token, resolve_api_key


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
