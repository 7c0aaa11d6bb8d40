"""A metered call's plan (hold, limits), outcome (what it did) and identity (by ids), as typed dataclasses."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from aiwriter.money import ZERO
from usage.models import UsageRecord
from usage.selectors import Limits


@dataclass
class CallPlan:
    started_at: datetime
    period: date
    limits: Limits
    reservation_id: int | None = None
    reserved: Decimal = ZERO


@dataclass
class CallOutcome:
    """What a call did. `billable`: it is charged and counted (success, or output delivered before a cut-off)."""

    status: str
    model: str
    provider: str = ""
    upstream_model: str = ""
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    completion_tokens: int = 0
    token_source: str = UsageRecord.TokenSource.MEASURED
    billable: bool = True
    cache_hit: bool = False
    fallback: bool = False
    latency_ms: int | None = None
    ttft_ms: int | None = None
    error_code: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CallMeta:
    """The identity of a call, by ids: kept on its hold as JSON so a reconcile can write the record."""

    user_id: int
    entry_point: str
    project: str = ""
    agent_id: int | None = None
    conversation_id: int | None = None
    message_id: int | None = None
    api_key_id: int | None = None
    debug: bool = False
    workflow_type: str = ""
    idempotency_key: str | None = None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CallMeta:
        """From a hold's context, which also holds the call's start, period and model."""
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


def call_meta(ctx: Any) -> CallMeta:
    def pk(obj: Any) -> Any:
        return getattr(obj, "pk", obj)

    return CallMeta(
        user_id=pk(ctx.user), project=ctx.project or "", agent_id=pk(ctx.agent),
        conversation_id=pk(ctx.conversation), message_id=pk(ctx.message), api_key_id=pk(ctx.api_key),
        entry_point=ctx.entry_point, debug=bool(ctx.debug), workflow_type=ctx.workflow_type or "",
        idempotency_key=getattr(ctx, "idempotency_key", None),
    )
