"""In-process caches for the per-call lookups of /v1 and the writer endpoints: the API key behind a bearer
token, and the model or agent a name means for that key.

Every call needs both. Read from the database each time they cost two queries and two thread hops (the
ORM runs in a worker thread), a large share of the gateway's own time per call. A hit is a dict lookup on
the event loop. Saving or deleting a key, a user, a model, an agent or a key's allowed models clears
this process's caches at once; other processes see such a change within LLM_ROUTE_CACHE_SECONDS (the
same bound the model routes already have), so a key revoked there stops working within seconds.
Only positive answers are kept (an unknown key or model always reaches the database), and at most
MAX_ENTRIES of each, so junk tokens cannot grow memory.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db.models.signals import m2m_changed, post_delete, post_save
from django.utils import timezone

from agents.models import Agent, LLMModel
from usage.models import ApiKey

MAX_ENTRIES = 10_000
# resolve_api_key writes last_used_at at most once a minute; a hit older than that goes to the database.
_LAST_USED_RESOLUTION = timedelta(minutes=1)

_keys: dict[str, tuple[float, Any]] = {}
_targets: dict[tuple[str, int | None], tuple[float, Any]] = {}


def _ttl() -> float:
    return time.monotonic() + settings.LLM_ROUTE_CACHE_SECONDS


def get_key(raw_key: str) -> Any | None:
    """The live ApiKey for a bearer token if this process knows it, else None (ask resolve_api_key)."""
    entry = _keys.get(ApiKey.hash_key(raw_key))
    if entry is None or entry[0] <= time.monotonic():
        return None
    api_key = entry[1]
    now = timezone.now()
    if api_key.revoked_at or (api_key.expires_at and api_key.expires_at <= now):
        return None
    if api_key.last_used_at is None or now - api_key.last_used_at > _LAST_USED_RESOLUTION:
        return None  # time to write last_used_at again: the database path does that
    return api_key


def put_key(raw_key: str, api_key: Any) -> None:
    if len(_keys) >= MAX_ENTRIES:
        _keys.clear()
    _keys[api_key.key_hash] = (_ttl(), api_key)


def get_target(name: str, api_key: Any | None) -> Any | None:
    entry = _targets.get((name, api_key.pk if api_key is not None else None))
    if entry is None or entry[0] <= time.monotonic():
        return None
    return entry[1]


def put_target(name: str, api_key: Any | None, target: Any) -> None:
    if len(_targets) >= MAX_ENTRIES:
        _targets.clear()
    _targets[(name, api_key.pk if api_key is not None else None)] = (_ttl(), target)


def clear(*args: Any, **kwargs: Any) -> None:
    _keys.clear()
    _targets.clear()


def connect() -> None:
    """Wires the clearing signals; called once from OpenaiCompatConfig.ready()."""
    for model in (ApiKey, get_user_model(), LLMModel, Agent):
        post_save.connect(clear, sender=model, dispatch_uid=f"openai-hotcache-save-{model.__name__}")
        post_delete.connect(clear, sender=model, dispatch_uid=f"openai-hotcache-delete-{model.__name__}")
    m2m_changed.connect(clear, sender=ApiKey.allowed_models.through, dispatch_uid="openai-hotcache-allowed-models")

