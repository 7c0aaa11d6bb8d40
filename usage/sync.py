"""Billing sync (seed 000's sync_to_backend): push unsynced usage records to settings.BILLING_SYNC_URL.

Per user, in batches, oldest first. Each batch is saved on the user's BillingSyncState (ids + idempotency key)
before it is sent and marked synced in one transaction after the backend accepts it, so:
- running twice sends nothing twice (synced records are never picked again);
- a run killed mid-send resends exactly that batch under the same key, which the backend deduplicates;
- two runs at once never send a user's records twice: one sender per user (a PostgreSQL advisory lock).
POST body: {"batch_id", "user", "records": [...]}; headers `Idempotency-Key` and, if set,
`Authorization: Bearer BILLING_SYNC_TOKEN`. 5xx, 429 and network errors are retried with exponential backoff.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import connection, transaction
from django.db.models import Sum
from django.utils import timezone

from usage.models import BillingSyncState, UsageRecord

logger = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (username, records done, records total)


class SyncError(Exception):
    pass


class SyncBusy(SyncError):
    """Another sync is sending this user's records right now: skipped, not failed (its state is left alone)."""


# pg_try_advisory_lock(namespace, user id): one sender per user across processes; released by PostgreSQL when the
# holding connection ends, so a killed run never leaves a stale lock behind.
_LOCK_NAMESPACE = 0x5A5C


@contextmanager
def _user_lock(user_id: int):
    if connection.vendor != "postgresql":
        yield  # SQLite (dev, bare tests): one writer anyway
        return
    key = [_LOCK_NAMESPACE, user_id & 0x7FFFFFFF]
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_lock(%s, %s)", key)
        if not cursor.fetchone()[0]:
            raise SyncBusy("another sync_usage run is sending this user's records; skipped")
    try:
        yield
    finally:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_unlock(%s, %s)", key)


@dataclass
class SyncReport:
    users: int = 0
    batches: int = 0
    records: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # another run held the user's lock


def _record_json(r: UsageRecord, username: str) -> dict[str, Any]:
    return {
        "id": r.pk, "created_at": r.created_at.isoformat(), "user": username, "project": r.project,
        "entry_point": r.entry_point, "workflow_type": r.workflow_type, "provider": r.provider, "model": r.model,
        "prompt_tokens": r.prompt_tokens, "cached_prompt_tokens": r.cached_prompt_tokens,
        "completion_tokens": r.completion_tokens, "total_tokens": r.total_tokens, "token_source": r.token_source,
        "cost": format(r.cost, "f"), "charged": r.charged, "status": r.status, "metadata": r.metadata,
    }


def _post(url: str, body: bytes, key: str, *, token: str, timeout: float, retries: int, backoff: float) -> None:
    headers = {"Content-Type": "application/json", "Idempotency-Key": key}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    for attempt in range(retries + 1):
        try:
            request = urllib.request.Request(url, data=body, headers=headers, method="POST")
            with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - configured URL
                response.read()
                return
        except urllib.error.HTTPError as exc:
            if exc.code < 500 and exc.code != 429:
                raise SyncError(f"billing backend refused the batch: HTTP {exc.code}") from exc
            error = f"HTTP {exc.code}"
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            error = str(getattr(exc, "reason", exc))
        if attempt < retries:
            time.sleep(backoff * (2 ** attempt))
    raise SyncError(f"billing backend unavailable after {retries + 1} attempts: {error}")


def _unsynced(user_id: int, since: datetime | None):
    qs = UsageRecord.objects.filter(user_id=user_id, synced_at__isnull=True, debug=False)
    if since:
        qs = qs.filter(created_at__gte=since)
    return qs.order_by("id")


def _send_batch(state: BillingSyncState, username: str, ids: list[int], key: str, **post: Any) -> int:
    records = list(UsageRecord.objects.filter(pk__in=ids).order_by("id"))
    body = json.dumps({"batch_id": key, "user": username,
                       "records": [_record_json(r, username) for r in records]}).encode()
    _post(body=body, key=key, **post)
    with transaction.atomic():
        now = timezone.now()
        UsageRecord.objects.filter(pk__in=ids, synced_at__isnull=True).update(synced_at=now)
        state.tokens_synced += sum(r.total_tokens for r in records)
        state.records_synced += len(records)
        state.last_synced_record_id = max(state.last_synced_record_id, max(ids))
        state.pending_batch, state.last_synced_at, state.error = None, now, ""
        state.save()
    return len(records)


def sync_user(user: Any, *, url: str, since: datetime | None = None, batch_size: int = 200,
              progress: Progress | None = None, token: str = "", timeout: float = 10.0, retries: int = 4,
              backoff: float = 0.5) -> tuple[int, int]:
    """Syncs one user's records; returns (batches, records). Raises SyncError (state saved as failed), or SyncBusy
    when another run is syncing this user (two runs at once would pick the same records under different keys)."""
    with _user_lock(user.pk):
        return _sync_user(user, url=url, since=since, batch_size=batch_size, progress=progress, token=token,
                          timeout=timeout, retries=retries, backoff=backoff)


def _sync_user(user: Any, *, url: str, since: datetime | None, batch_size: int, progress: Progress | None,
               token: str, timeout: float, retries: int, backoff: float) -> tuple[int, int]:
    state, _ = BillingSyncState.objects.get_or_create(user=user)
    username = user.get_username()
    post = {"url": url, "token": token, "timeout": timeout, "retries": retries, "backoff": backoff}
    total = _unsynced(user.pk, since).count()
    done = batches = 0
    state.status = BillingSyncState.Status.RUNNING
    state.save(update_fields=["status", "updated_at"])
    try:
        if state.pending_batch:  # a previous run died mid-send: the same batch, the same key
            pending = state.pending_batch
            sent = _send_batch(state, username, pending["ids"], pending["key"], **post)
            done, batches = done + sent, batches + 1
            total = max(total, done)
        while True:
            ids = list(_unsynced(user.pk, since).values_list("id", flat=True)[:batch_size])
            if not ids:
                break
            key = f"usage-{user.pk}-{ids[0]}-{ids[-1]}-{uuid.uuid4().hex[:12]}"
            state.pending_batch = {"key": key, "ids": ids}
            state.save(update_fields=["pending_batch", "updated_at"])
            done += _send_batch(state, username, ids, key, **post)
            batches += 1
            if progress:
                progress(username, done, max(total, done))
    except SyncError as exc:
        state.status, state.error = BillingSyncState.Status.FAILED, str(exc)[:2000]
        state.save(update_fields=["status", "error", "updated_at"])
        raise
    state.status = BillingSyncState.Status.OK
    state.save(update_fields=["status", "updated_at"])
    if progress and not batches:
        progress(username, 0, 0)
    return batches, done


def sync_usage(*, url: str | None = None, username: str | None = None, since: datetime | None = None,
               batch_size: int = 200, progress: Progress | None = None, **options: Any) -> SyncReport:
    """Syncs every user with unsynced records (or one user); a failing user does not stop the others."""
    url = url or settings.BILLING_SYNC_URL
    if not url:
        raise SyncError("BILLING_SYNC_URL is not set.")
    options.setdefault("token", settings.BILLING_SYNC_TOKEN)
    users = get_user_model().objects.order_by("pk")
    if username:
        users = users.filter(username=username)
    else:
        pending_users = _unsynced_user_ids(since) | set(
            BillingSyncState.objects.filter(pending_batch__isnull=False).values_list("user_id", flat=True))
        users = users.filter(pk__in=pending_users)
    report = SyncReport()
    for user in users:
        report.users += 1
        try:
            batches, records = sync_user(user, url=url, since=since, batch_size=batch_size, progress=progress,
                                         **options)
        except SyncBusy:
            report.skipped.append(user.get_username())
            continue
        except SyncError as exc:
            report.failed[user.get_username()] = str(exc)
            logger.warning("billing sync for %s failed: %s", user.get_username(), exc)
            continue
        report.batches += batches
        report.records += records
    return report


def _unsynced_user_ids(since: datetime | None) -> set[int]:
    qs = UsageRecord.objects.filter(synced_at__isnull=True, debug=False)
    if since:
        qs = qs.filter(created_at__gte=since)
    return set(qs.order_by().values_list("user_id", flat=True).distinct())


def sync_totals() -> dict[str, int]:
    row = BillingSyncState.objects.aggregate(tokens=Sum("tokens_synced"), records=Sum("records_synced"))
    return {"tokens": row["tokens"] or 0, "records": row["records"] or 0}
