"""POST /api/usage/consume/: trusted services report consumption; one idempotency key records once."""

from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import pytest
from django.db import connection
from rest_framework.test import APIClient

from tests.factories import make_api_key, make_model, make_user
from usage.billing.ledger import grant_credits
from usage.models import CreditAccount, IdempotencyKey, UsageCounter, UsageRecord


def _body(**kw):
    return {"user": "carol", "workflow_type": "summarize", "tokens_used": 1500, "metadata": {"job": 7},
            "idempotency_key": "job-7", **kw}


@pytest.mark.django_db
def test_consume_records_once_per_key_and_counts_toward_quota():
    make_user("carol")
    _, raw = make_api_key(make_user(staff=True))
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    first = client.post("/api/usage/consume/", _body(), format="json")
    again = client.post("/api/usage/consume/", _body(), format="json")
    assert first.status_code == 201 and again.status_code == 200 and again.json()["replayed"] is True
    assert first.json()["id"] == again.json()["id"]
    record = UsageRecord.objects.get()
    assert record.entry_point == "external" and record.workflow_type == "summarize" and record.total_tokens == 1500
    assert UsageCounter.objects.get(project="").tokens == 1500
    assert first.json()["quota_exceeded"] is False


@pytest.mark.django_db
def test_consumption_past_the_quota_is_recorded_and_flagged():
    from usage.models import Quota

    carol = make_user("carol")
    Quota.objects.create(user=carol, monthly_token_limit=1000)
    client = APIClient()
    client.force_authenticate(make_user(staff=True))
    body = client.post("/api/usage/consume/", _body(), format="json").json()
    assert body["quota_exceeded"] is True and UsageRecord.objects.count() == 1


@pytest.mark.django_db
def test_same_key_with_another_body_is_409():
    make_user("carol")
    client = APIClient()
    client.force_authenticate(make_user(staff=True))
    client.post("/api/usage/consume/", _body(), format="json")
    response = client.post("/api/usage/consume/", _body(tokens_used=1), format="json")
    assert response.status_code == 409 and response.json()["error"]["code"] == "idempotency_key_reused"


@pytest.mark.django_db
def test_consume_is_staff_only_and_validates():
    carol = make_user("carol")
    client = APIClient()
    client.force_authenticate(carol)
    assert client.post("/api/usage/consume/", _body(), format="json").status_code == 403
    client.force_authenticate(make_user(staff=True))
    assert client.post("/api/usage/consume/", _body(tokens_used=-1), format="json").status_code == 400
    assert client.post("/api/usage/consume/", _body(model="nope"), format="json").status_code == 400


@pytest.mark.django_db
def test_consume_with_a_model_is_priced_and_charged():
    carol = make_user("carol")
    grant_credits(user=carol, amount=Decimal("1"), reason="t", created_by=None)
    make_model("writer-1", input_price="1", output_price="4")
    client = APIClient()
    client.force_authenticate(make_user(staff=True))
    body = client.post("/api/usage/consume/", _body(model="writer-1"), format="json").json()
    assert body["cost"] == "0.006" and body["charged"] is True
    assert CreditAccount.objects.get(user=carol).balance == Decimal("0.994")


@pytest.mark.pg
@pytest.mark.django_db(transaction=True)
def test_50_concurrent_copies_record_once():
    carol = make_user("carol")
    grant_credits(user=carol, amount=Decimal("1"), reason="t", created_by=None)
    make_model("writer-1", input_price="1", output_price="4")
    _, raw = make_api_key(make_user(staff=True))

    def post(_):
        try:
            client = APIClient()
            client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
            return client.post("/api/usage/consume/", _body(model="writer-1"), format="json").status_code
        finally:
            connection.close()

    with ThreadPoolExecutor(max_workers=16) as pool:
        codes = list(pool.map(post, range(50)))
    assert codes.count(201) == 1 and codes.count(200) == 49
    assert UsageRecord.objects.count() == 1 and IdempotencyKey.objects.count() == 1
    assert CreditAccount.objects.get(user=carol).balance == Decimal("0.994")
    assert UsageCounter.objects.get(project="").tokens == 1500
