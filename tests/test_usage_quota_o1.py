"""Quota checks are O(1): running counters, never a sum over the records (however many there are)."""

from decimal import Decimal

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from agents.llm.types import ChatRequest
from tests.factories import make_api_key, make_model, make_user
from usage.billing.calls import CallOutcome, call_meta
from usage.billing.holds import begin_call
from usage.billing.ledger import grant_credits
from usage.billing.recording import record_call
from usage.metering import CallContext
from usage.models import ApiKey, Quota, UsageRecord
from usage.selectors import quota_status

pytestmark = pytest.mark.django_db(transaction=True)

RECORDS_TABLE = UsageRecord._meta.db_table


def _reads_records(sql: str) -> bool:
    # The record is INSERTed (maybe inside a WITH … statement); nothing on the hot path may SELECT from it.
    return f'FROM "{RECORDS_TABLE}"' in sql or f"FROM {RECORDS_TABLE}" in sql or f'JOIN "{RECORDS_TABLE}"' in sql


def test_quota_check_never_reads_the_records_and_costs_the_same_with_more_history():
    user = make_user()
    grant_credits(user=user, amount=Decimal("1"), reason="t", created_by=None)
    model = make_model(input_price="1", output_price="1")
    Quota.objects.create(user=user, monthly_token_limit=10**9, monthly_cost_limit=Decimal("100"))
    key, _ = make_api_key(user)
    ApiKey.objects.filter(pk=key.pk).update(monthly_budget=Decimal("100"))
    key.refresh_from_db()
    ctx = CallContext(user=user, entry_point="openai", api_key=key, project="blog")
    counts = []
    for i in range(4):
        request = ChatRequest(model=model.name, messages=[{"role": "user", "content": "hi"}], max_tokens=10)
        with CaptureQueriesContext(connection) as queries:
            plan = begin_call(ctx=ctx, request=request)
            record_call(meta=call_meta(ctx), plan=plan, outcome=CallOutcome(
                status="success", model=model.name, provider="p", prompt_tokens=5, completion_tokens=10))
        assert not [q["sql"] for q in queries.captured_queries if _reads_records(q["sql"])]
        counts.append(len(queries.captured_queries))
        if i == 1:  # a long history must not change the cost of the next check
            UsageRecord.objects.bulk_create([UsageRecord(user=user, entry_point="chat", total_tokens=1)
                                             for _ in range(500)])
    assert counts[1] == counts[2] == counts[3]
    with CaptureQueriesContext(connection) as queries:
        status = quota_status(user=user, project="blog")
    assert status["usage"]["tokens"] == 4 * 15 and not [q for q in queries.captured_queries
                                                        if _reads_records(q["sql"])]
