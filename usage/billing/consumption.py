"""Consumption reported by trusted services (seed 000's ConsumeQuota), once per idempotency key."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from django.db import IntegrityError, transaction
from django.utils import timezone

from aiwriter.errors import Conflict
from usage import periods
from usage.billing.calls import CallOutcome, CallPlan, call_meta
from usage.billing.counters import deliver_alerts
from usage.billing.holds import _over_quota
from usage.billing.ledger import ensure_account
from usage.billing.recording import record_call
from usage.models import IdempotencyKey, UsageRecord
from usage.selectors import quota_limits

if TYPE_CHECKING:
    from django.contrib.auth.models import User


# --- Consumption reported by trusted services (seed 000's ConsumeQuota) -------------------------------------------

@dataclass
class _ExternalContext:
    user: Any
    entry_point: str = UsageRecord.EntryPoint.EXTERNAL
    api_key: Any = None
    project: str = ""
    agent: Any = None
    conversation: Any = None
    message: Any = None
    debug: bool = False
    workflow_type: str = ""
    idempotency_key: str | None = None


def _request_hash(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def record_consumption(*, caller: User, user: User, workflow_type: str, tokens_used: int,
                       idempotency_key: str, model: str = "", metadata: dict[str, Any] | None = None,
                       project: str = "", now: datetime | None = None) -> tuple[dict[str, Any], bool]:
    """Records tokens another service spent for `user`, once per idempotency key; returns (response, created).

    The tokens are priced as output at the model's price in force (free without a model) and charged up to the
    free balance: the tokens are already spent, so the record is never refused. Same key, other body: 409.
    """
    metadata = metadata or {}
    body = {"user": user.get_username(), "workflow_type": workflow_type, "tokens_used": tokens_used,
            "model": model, "metadata": metadata, "project": project}
    digest = _request_hash(body)
    with transaction.atomic():
        try:
            with transaction.atomic():
                key, created = IdempotencyKey.objects.get_or_create(
                    scope="consume", user=caller, key=idempotency_key, defaults={"request_hash": digest})
        except IntegrityError:  # lost a race on a backend without blocking inserts: the winner's row is there
            key, created = IdempotencyKey.objects.get(scope="consume", user=caller, key=idempotency_key), False
        if not created:
            if key.request_hash != digest:
                raise Conflict("This idempotency key was used with a different request.",
                               code="idempotency_key_reused")
            return key.response or {}, False
        ctx = _ExternalContext(user=user, project=project, workflow_type=workflow_type,
                               idempotency_key=f"consume:{caller.pk}:{idempotency_key}")
        started_at = now or timezone.now()
        plan = CallPlan(started_at=started_at, period=periods.month_start(started_at),
                        limits=quota_limits(user_id=user.pk, project=project))
        outcome = CallOutcome(status=UsageRecord.Status.SUCCESS, model=model, completion_tokens=tokens_used,
                              token_source=UsageRecord.TokenSource.MEASURED, metadata=metadata)
        if model:
            ensure_account(user)
        record, alerts = record_call(meta=call_meta(ctx), plan=plan, outcome=outcome)
        response = {"id": record.pk, "user": user.get_username(), "workflow_type": workflow_type,
                    "tokens_used": tokens_used, "model": model, "cost": format(record.cost.normalize(), "f"),
                    "charged": record.charged, "idempotency_key": idempotency_key,
                    "created_at": record.created_at.isoformat(),
                    # Already spent, so recorded regardless; this tells the caller to stop its user's work.
                    "quota_exceeded": _over_quota(user_id=user.pk, project=project, period=plan.period,
                                                  limits=plan.limits)}
        key.response = response
        key.save(update_fields=["response"])
    deliver_alerts(alerts)
    return response, True
