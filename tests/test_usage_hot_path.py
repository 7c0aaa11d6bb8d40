"""The metering hot path runs a small fixed number of queries (pinned here; chat and /v1 add theirs on top)."""

from decimal import Decimal

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from agents.llm.types import ChatRequest
from tests.factories import make_api_key, make_model, make_user
from usage.metering import CallContext
from usage.models import ApiKey, Quota
from usage.services import CallOutcome, begin_call, call_meta, grant_credits, record_call

pytestmark = pytest.mark.django_db(transaction=True)

# Django captures each transaction's BEGIN and COMMIT too.
TXN = 2


def _call(ctx, model):
    request = ChatRequest(model=model.name, messages=[{"role": "user", "content": "hi"}], max_tokens=10)
    with CaptureQueriesContext(connection) as before:
        plan = begin_call(ctx=ctx, request=request)
    outcome = CallOutcome(status="success", model=model.name, provider="p", prompt_tokens=5, completion_tokens=10)
    with CaptureQueriesContext(connection) as after:
        record_call(meta=call_meta(ctx), plan=plan, outcome=outcome)
    return len(before), len(after) - TXN


def test_priced_call_queries():
    user = make_user()
    grant_credits(user=user, amount=Decimal("1"), reason="t", created_by=None)
    model = make_model(input_price="1", output_price="1")
    _call(CallContext(user=user, entry_point="chat"), model)  # warms the price cache
    # before: quota rows, hold UPDATE, reservation INSERT
    # after: record INSERT, reservation UPDATE, account UPDATE, ledger INSERT, counter upsert, rollup upsert
    assert _call(CallContext(user=user, entry_point="chat"), model) == (3 + TXN, 6)


def test_with_quota_project_and_key_budget():
    user = make_user()
    grant_credits(user=user, amount=Decimal("1"), reason="t", created_by=None)
    model = make_model(input_price="1", output_price="1")
    Quota.objects.create(user=user, monthly_token_limit=10**9)
    key, _ = make_api_key(user)
    ApiKey.objects.filter(pk=key.pk).update(monthly_budget=Decimal("100"))
    key.refresh_from_db()
    ctx = CallContext(user=user, entry_point="openai", api_key=key, project="blog")
    _call(ctx, model)
    # + counters read, + key counter read; after: + project counter upsert, + key counter upsert
    assert _call(ctx, model) == (5 + TXN, 8)


def test_free_model_needs_no_hold():
    user = make_user()
    model = make_model()
    ctx = CallContext(user=user, entry_point="chat")
    _call(ctx, model)
    # before: quota rows only; after: record INSERT, counter upsert, rollup upsert
    assert _call(ctx, model) == (1, 3)
