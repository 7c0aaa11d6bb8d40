"""Permissions beyond DRF's own."""

from __future__ import annotations

from rest_framework.permissions import IsAuthenticated

from aiwriter.errors import ApiError
from usage.models import ApiKey


class KeyManagementRequiresSession(ApiError):
    status_code = 403
    code = "key_management_requires_session"
    message = ("API keys are managed from a signed-in session (the account page) or by staff in the admin, "
               "not with an API key.")


class SessionOnly(IsAuthenticated):
    """A signed-in user, but not through an API key.

    Why: a key may carry limits (models, rpm/tpm, budget, project, expiry). If a key could create, list or
    revoke keys, a limited key could mint an unlimited one, or revoke its user's other keys. So keys are
    managed by the person (session), never by a key (docs/usage-and-billing.md, "API keys").
    """

    def has_permission(self, request, view) -> bool:
        if not super().has_permission(request, view):
            return False  # DRF answers 401 (no credentials) as for every other route
        if isinstance(request.auth, ApiKey):
            raise KeyManagementRequiresSession()
        return True
