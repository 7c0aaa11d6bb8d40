"""A call's identity travels as a typed, frozen CallMeta; on its hold as JSON, read back the same by reconcile."""

import dataclasses
from decimal import Decimal

import pytest

from agents.llm.types import ChatRequest
from tests.factories import make_api_key, make_model, make_user
from usage.billing.calls import CallMeta, call_meta
from usage.billing.holds import begin_call
from usage.billing.ledger import grant_credits
from usage.metering import CallContext
from usage.models import Reservation

pytestmark = pytest.mark.django_db


def test_the_hold_keeps_the_call_meta_and_reconcile_reads_back_the_same():
    user = make_user()
    grant_credits(user=user, amount=Decimal("1"), reason="t", created_by=None)
    model = make_model(input_price="1", output_price="1")
    api_key, _ = make_api_key(user)
    ctx = CallContext(user=user, entry_point="writer", api_key=api_key, project="p1", workflow_type="topics")
    meta = call_meta(ctx)
    assert meta == CallMeta(user_id=user.pk, entry_point="writer", project="p1", api_key_id=api_key.pk,
                            workflow_type="topics")
    with pytest.raises(dataclasses.FrozenInstanceError):
        meta.user_id = 0

    plan = begin_call(ctx=ctx, request=ChatRequest(model=model.name, messages=[], max_tokens=5))
    context = Reservation.objects.get(pk=plan.reservation_id).context
    # The same JSON keys as before CallMeta (reconcile and the sweeper read holds written by older versions).
    assert set(context) == {"user_id", "project", "agent_id", "conversation_id", "message_id", "api_key_id",
                            "entry_point", "debug", "workflow_type", "idempotency_key", "started_at", "period",
                            "model"}
    assert CallMeta.from_json(context) == meta


def test_a_hold_written_without_the_newer_keys_still_reads():
    assert CallMeta.from_json({"user_id": 3, "entry_point": "chat", "model": "m"}) == CallMeta(
        user_id=3, entry_point="chat")
