"""Bearer API-key authentication for DRF, plain views and websockets."""

from __future__ import annotations

from datetime import timedelta

from django.utils import timezone
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions

from usage.models import ApiKey

# last_used_at is a hint, not an audit log: write it at most once a minute per key.
_LAST_USED_RESOLUTION = timedelta(minutes=1)


def bearer_token(authorization_header: str) -> str | None:
    scheme, _, token = (authorization_header or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def resolve_api_key(raw_key: str) -> ApiKey | None:
    """The live key for a raw bearer token, or None if unknown, revoked or expired."""
    try:
        api_key = ApiKey.objects.select_related("user").get(key_hash=ApiKey.hash_key(raw_key))
    except ApiKey.DoesNotExist:
        return None
    now = timezone.now()
    if api_key.revoked_at or (api_key.expires_at and api_key.expires_at <= now) or not api_key.user.is_active:
        return None
    if api_key.last_used_at is None or now - api_key.last_used_at > _LAST_USED_RESOLUTION:
        ApiKey.objects.filter(pk=api_key.pk).update(last_used_at=now)
        api_key.last_used_at = now
    return api_key


class ApiKeyAuthentication(authentication.BaseAuthentication):
    keyword = "Bearer"

    def authenticate(self, request):
        header = request.META.get("HTTP_AUTHORIZATION", "")
        if not header:
            return None
        raw = bearer_token(header)
        if raw is None:
            raise exceptions.AuthenticationFailed("Malformed Authorization header; expected 'Bearer <key>'.")
        api_key = resolve_api_key(raw)
        if api_key is None:
            raise exceptions.AuthenticationFailed("Invalid, revoked or expired API key.")
        return api_key.user, api_key

    def authenticate_header(self, request) -> str:
        return self.keyword


class ApiKeySchemaExtension(OpenApiAuthenticationExtension):
    target_class = ApiKeyAuthentication
    name = "ApiKeyAuth"

    def get_security_definition(self, auto_schema):
        return {"type": "http", "scheme": "bearer", "description": "aiwriter API key (aiw_…)"}
