"""Websocket auth: a Django session cookie or an `Authorization: Bearer` header."""

from __future__ import annotations

from importlib import import_module
from types import SimpleNamespace

from channels.auth import AuthMiddleware
from channels.db import database_sync_to_async
from channels.sessions import CookieMiddleware, SessionMiddleware
from django.conf import settings
from django.contrib import auth
from django.contrib.auth import get_user_model
from django.db import connection
from django.db.models import Q
from django.utils import timezone
from django.utils.crypto import constant_time_compare

from aiwriter import dbpool
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


_DB_SESSIONS = "django.contrib.sessions.backends.db"
_MODEL_BACKEND = "django.contrib.auth.backends.ModelBackend"


async def credential_is_live_async(user, api_key: ApiKey | None, session) -> bool:
    """credential_is_live on the async pool (one statement, no thread hop) where it can answer; else the sync one.

    The pool answers a key, and a database session whose answer needs no write: gone or expired, or for this
    user with the same password hash (or that user inactive or gone). Anything else (another session engine or
    auth backend, a hash that no longer matches, which Django's check answers by flushing the session) is the
    sync function's.
    """
    if dbpool.enabled() and getattr(settings, "WS_TURN_START_ON_POOL", True):
        try:
            if api_key is not None:
                return await _key_is_live(api_key)
            live = await _session_is_live(user, session)
            if live is not None:
                return live
        except dbpool.PoolTimeout:
            pass
        except dbpool.psycopg.Error as exc:
            raise dbpool.django_error(exc) from exc
    return await database_sync_to_async(credential_is_live)(user, api_key, session)


async def _key_is_live(api_key: ApiKey) -> bool:
    users = connection.ops.quote_name(get_user_model()._meta.db_table)
    keys = connection.ops.quote_name(ApiKey._meta.db_table)
    row = await dbpool.fetchone(
        f"SELECT 1 FROM {keys} k JOIN {users} u ON u.id = k.user_id WHERE k.id = %s AND k.revoked_at IS NULL "
        f"AND (k.expires_at IS NULL OR k.expires_at > %s) AND u.is_active", [api_key.pk, timezone.now()])
    return row is not None


async def _session_is_live(user, session) -> bool | None:
    session_key = getattr(session, "session_key", None)
    if not session_key or user is None:
        return False
    if settings.SESSION_ENGINE != _DB_SESSIONS:
        return None
    store_class = import_module(settings.SESSION_ENGINE).SessionStore
    user_model = get_user_model()
    sessions = connection.ops.quote_name(store_class.get_model_class()._meta.db_table)
    users = connection.ops.quote_name(user_model._meta.db_table)
    row = await dbpool.fetchone(
        f"SELECT s.session_data, u.password, u.is_active FROM {sessions} s LEFT JOIN {users} u ON u.id = %s "
        f"WHERE s.session_key = %s AND s.expire_date > %s", [user.pk, session_key, timezone.now()])
    if row is None:
        return False  # logged out or expired: an empty session, an anonymous user
    data = store_class().decode(row[0])
    if str(data.get(auth.SESSION_KEY)) != str(user.pk) or data.get(auth.BACKEND_SESSION_KEY) != _MODEL_BACKEND \
            or _MODEL_BACKEND not in settings.AUTHENTICATION_BACKENDS:
        return None
    if row[1] is None or not row[2]:
        return False  # the user is gone or inactive: ModelBackend finds no user (nothing written)
    stored_hash = data.get(auth.HASH_SESSION_KEY)
    current_hash = user_model(pk=user.pk, password=row[1]).get_session_auth_hash()
    if stored_hash and constant_time_compare(stored_hash, current_hash):
        return True
    return None
