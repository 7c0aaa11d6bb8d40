"""API keys: creation (the raw secret is returned once, never stored) and revocation."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from django.db import transaction
from django.utils import timezone

from usage.models import ApiKey

if TYPE_CHECKING:
    from django.contrib.auth.models import User


# --- API keys -----------------------------------------------------------------------------------------------------

@transaction.atomic
def create_api_key(*, user: User, name: str = "default", project: str = "",
                   expires_at: datetime | None = None) -> tuple[ApiKey, str]:
    """Creates a key and returns it with the raw secret, which is never stored or shown again."""
    raw, prefix, key_hash = ApiKey.generate()
    api_key = ApiKey.objects.create(user=user, name=name, prefix=prefix, key_hash=key_hash, project=project,
                                    expires_at=expires_at)
    return api_key, raw


def revoke_api_key(*, api_key: ApiKey) -> ApiKey:
    if api_key.revoked_at is None:
        api_key.revoked_at = timezone.now()
        api_key.save(update_fields=["revoked_at"])
    return api_key
