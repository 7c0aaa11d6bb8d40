"""The usage API: wiring, permissions (bob never sees alice's), money as strings, error shapes."""

import csv
import io
from datetime import datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
from django.utils import timezone

from tests.factories import make_api_key, make_model, make_user
from tests.fixtures_usage import simulate_call
from usage.billing.ledger import grant_credits
from usage.models import Quota
from usage.selectors import UsageFilter, usage_stats

pytestmark = pytest.mark.django_db

SHANGHAI = ZoneInfo("Asia/Shanghai")


def _auth(api_client, user):
    api_client.force_authenticate(user)
    return api_client


@pytest.fixture
def alice_and_bob():
    alice, bob = make_user("alice"), make_user("bob")
    grant_credits(user=alice, amount=Decimal("5"), reason="t", created_by=None)
    model = make_model("gpt-x", input_price="2.5", output_price="10")
    simulate_call(alice, model=model.name, prompt=1000, completion=100)  # 0.0025 + 0.001
    simulate_call(bob, prompt=7, completion=3)
    return alice, bob


def test_stats_totals_and_groups(api_client, alice_and_bob):
    alice, _ = alice_and_bob
    body = _auth(api_client, alice).get("/api/usage/stats/").json()
    assert body["totals"]["calls"] == 1 and body["totals"]["total_tokens"] == 1100
    assert body["totals"]["cost"] == "0.0035" and body["totals"]["cost_cents"] == 0
    assert body["by_model"][0]["model"] == "gpt-x" and body["by_provider"][0]["provider"] == "test"
    assert body["by_day"][0]["day"] == timezone.now().astimezone(SHANGHAI).date().isoformat()


def test_stats_from_rollups_equal_stats_from_records():
    users = [make_user() for _ in range(3)]
    models = [make_model(input_price="0.1234", output_price="7"), make_model(input_price="3", output_price="0.0001")]
    start = datetime(2027, 3, 1, 10, tzinfo=SHANGHAI)
    for user in users:
        grant_credits(user=user, amount=Decimal("1"), reason="t", created_by=None)
    for i in range(40):
        user = users[i % 3]
        simulate_call(user, model=models[i % 2].name, prompt=17 * i + 1, completion=(i * 31) % 97, cached=i % 5,
                      project=["", "blog"][i % 2], now=start + timedelta(hours=13 * i),
                      status="success" if i % 7 else "error", billable=bool(i % 7))
    for user in [*users, None]:
        flt = UsageFilter(user_id=user.pk if user else None, start=start.date(), end=start.date() + timedelta(days=40))
        from_rollup = usage_stats(flt, group_by=["provider", "model", "day", "project"])
        from_records = usage_stats(flt, group_by=["provider", "model", "day", "project"], source="records")
        assert from_rollup == from_records and from_rollup["totals"]["calls"] > 0


def test_users_see_only_their_own_and_staff_may_pass_user(api_client, alice_and_bob):
    alice, bob = alice_and_bob
    client = _auth(api_client, bob)
    assert client.get("/api/usage/records/").json()["count"] == 1
    assert client.get("/api/usage/stats/?user=alice").status_code == 403
    assert client.get("/api/usage/balance/?user=alice").status_code == 403
    staff = _auth(api_client, make_user(staff=True))
    assert staff.get("/api/usage/records/?user=alice").json()["results"][0]["model"] == "gpt-x"
    assert staff.get("/api/usage/stats/?user=nobody").status_code == 404


def test_records_page_and_money_strings(api_client, alice_and_bob):
    alice, _ = alice_and_bob
    body = _auth(api_client, alice).get("/api/usage/records/?limit=10&offset=0").json()
    record = body["results"][0]
    assert record["cost"] == "0.0035" and record["token_source"] == "measured" and record["estimated"] is False


def test_csv_export(api_client, alice_and_bob):
    alice, _ = alice_and_bob
    response = _auth(api_client, alice).get("/api/usage/records/export.csv")
    assert response.status_code == 200 and response["Content-Type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(b"".join(response.streaming_content).decode())))
    assert len(rows) == 1 and rows[0]["cost"] == "0.0035" and rows[0]["model"] == "gpt-x"


def test_bad_query_is_400_in_our_error_shape(api_client):
    body = _auth(api_client, make_user()).get("/api/usage/stats/?start=2027-02-01&end=2027-01-01").json()
    assert body["error"]["code"] == "invalid"
    assert _auth(api_client, make_user()).get("/api/usage/stats/?group_by=weekday").status_code == 400


def test_quota_endpoint_shape(api_client):
    user = make_user()
    Quota.objects.create(user=user, monthly_token_limit=100, monthly_cost_limit=Decimal("2"))
    simulate_call(user, prompt=95)
    body = _auth(api_client, user).get("/api/usage/quota/").json()
    assert body["exceeded"] is False and body["usage"] == {"tokens": 95, "cost": "0"}
    assert body["limits"] == {"tokens": 100, "cost": "2"}
    assert body["percentage"] == {"tokens": 95.0, "cost": 0.0}
    assert body["alert"]["level"] == "warning" and "95%" in body["alert"]["message"]


def test_cache_hit_rate(api_client):
    user = make_user()
    simulate_call(user, prompt=5)
    body = _auth(api_client, user).get("/api/usage/cache-hit-rate/").json()
    assert body["calls"] == 1 and body["cache_hits"] == 0 and body["hit_rate"] == 0.0


def test_balance_and_ledger_sum(api_client, alice_and_bob):
    alice, _ = alice_and_bob
    client = _auth(api_client, alice)
    balance = client.get("/api/usage/balance/").json()
    assert balance == {"balance": "4.9965", "reserved": "0", "available": "4.9965", "currency": "CNY"}
    entries = client.get("/api/usage/ledger/?limit=100").json()["results"]
    assert {e["kind"] for e in entries} == {"topup", "charge"}
    assert sum(Decimal(e["amount"]) for e in entries) == Decimal(balance["balance"])


def test_credits_staff_only(api_client):
    alice = make_user("alice2")
    body = {"user": "alice2", "amount": "12.5", "reason": "promo"}
    assert _auth(api_client, alice).post("/api/usage/credits/", body, format="json").status_code == 403
    staff = make_user(staff=True)
    response = _auth(api_client, staff).post("/api/usage/credits/", body, format="json")
    assert response.status_code == 201 and response.json()["amount"] == "12.5"
    bad = _auth(api_client, staff).post("/api/usage/credits/", {**body, "amount": "-1"}, format="json")
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid"
    unknown = _auth(api_client, staff).post("/api/usage/credits/", {**body, "user": "ghost"}, format="json")
    assert unknown.status_code == 400


def test_users_cannot_write_balance_quota_or_prices(api_client):
    user = make_user()
    _, raw = make_api_key(user)
    api_client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    for url in ("/api/usage/balance/", "/api/usage/quota/", "/api/usage/ledger/"):
        assert api_client.post(url, {"balance": "1000"}, format="json").status_code == 405
    # Nor mint a key (keys are managed from a session: test_api_keys_api.py); a session's new key has no limits
    # set by the body either: limits are set by staff in the admin.
    response = api_client.post("/api/keys/", {"name": "k", "monthly_budget": "9999", "rpm": 1}, format="json")
    assert response.status_code == 403 and response.json()["error"]["code"] == "key_management_requires_session"
    api_client.credentials()
    api_client.force_authenticate(user)
    response = api_client.post("/api/keys/", {"name": "k", "monthly_budget": "9999", "rpm": 1}, format="json")
    assert response.status_code == 201 and response.json()["monthly_budget"] is None
    assert response.json()["rpm"] is None


def test_new_account_gets_the_configured_credit_once(api_client, settings):
    settings.NEW_USER_CREDIT = Decimal("3.5")
    user = make_user()
    client = _auth(api_client, user)
    assert client.get("/api/usage/balance/").json()["balance"] == "3.5"
    assert client.get("/api/usage/balance/").json()["balance"] == "3.5"
    entries = client.get("/api/usage/ledger/").json()["results"]
    assert [(e["kind"], e["amount"]) for e in entries] == [("topup", "3.5")]


def test_rebuild_rollups_restores_agreement_with_records():
    from django.core.management import call_command

    from usage.models import DailyRollup

    users = [make_user(), make_user()]
    model = make_model(input_price="1", output_price="3")
    for user in users:
        grant_credits(user=user, amount=Decimal("1"), reason="t", created_by=None)
    start = datetime(2027, 5, 30, 20, tzinfo=SHANGHAI)
    for i in range(12):
        simulate_call(users[i % 2], model=model.name, prompt=10 * i, completion=i, now=start + timedelta(hours=5 * i))
    DailyRollup.objects.update(calls=999, cost=Decimal("7"))  # drifted
    call_command("rebuild_rollups", "--since", "2027-05-01", "--until", "2027-06-30", stdout=io.StringIO())
    flt = UsageFilter(start=start.date(), end=start.date() + timedelta(days=5))
    assert usage_stats(flt) == usage_stats(flt, source="records")


def test_stats_over_a_year_never_read_the_raw_records(api_client):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    user = make_user()
    simulate_call(user, prompt=5)
    client = _auth(api_client, user)
    today = timezone.now().astimezone(SHANGHAI).date()
    with CaptureQueriesContext(connection) as queries:
        body = client.get(f"/api/usage/stats/?start={today - timedelta(days=365)}&end={today}").json()
    assert body["totals"]["calls"] == 1
    assert not [q for q in queries.captured_queries if "usage_usagerecord" in q["sql"]]
    assert len(queries.captured_queries) <= 6  # session/auth aside: totals + three groups


def test_response_shapes_are_the_documented_contract(api_client, alice_and_bob):
    """Every key the issue spells out is there, money is a decimal string, never a float."""
    alice, _ = alice_and_bob
    client = _auth(api_client, alice)
    stats = client.get("/api/usage/stats/?group_by=provider,model,day").json()
    assert {"totals", "by_provider", "by_model", "by_day"} <= set(stats)
    for row in [stats["totals"], *stats["by_provider"], *stats["by_model"], *stats["by_day"]]:
        assert {"calls", "prompt_tokens", "completion_tokens", "total_tokens", "cost"} <= set(row)
        assert isinstance(row["cost"], str) and isinstance(row["cost_cents"], int)
    records = client.get("/api/usage/records/?limit=1&offset=0").json()
    assert {"count", "results"} <= set(records) and isinstance(records["results"][0]["cost"], str)
    quota = client.get("/api/usage/quota/").json()
    assert {"exceeded", "usage", "limits", "percentage", "alert"} <= set(quota)
    assert set(quota["usage"]) == set(quota["limits"]) == set(quota["percentage"]) == {"tokens", "cost"}
    assert quota["alert"] is None and quota["limits"] == {"tokens": None, "cost": None}  # unlimited
    rate = client.get("/api/usage/cache-hit-rate/").json()
    assert {"calls", "cache_hits", "hit_rate"} <= set(rate)
    balance = client.get("/api/usage/balance/").json()
    assert {"balance", "reserved", "currency"} <= set(balance)
    assert all(isinstance(balance[k], str) for k in ("balance", "reserved", "available"))
    for entry in client.get("/api/usage/ledger/").json()["results"]:
        assert {"amount", "kind", "reason", "created_at"} <= set(entry) and isinstance(entry["amount"], str)


def test_quota_alert_is_level_and_message(api_client):
    user = make_user()
    Quota.objects.create(user=user, monthly_token_limit=10)
    simulate_call(user, prompt=10)
    body = _auth(api_client, user).get("/api/usage/quota/").json()
    assert set(body["alert"]) == {"level", "message"} and body["alert"]["level"] == "critical"
    assert body["exceeded"] is True and body["percentage"]["tokens"] == 100.0


def test_stats_filters_by_project_agent_and_model(api_client):
    from tests.factories import make_agent

    user = make_user()
    grant_credits(user=user, amount=Decimal("1"), reason="t", created_by=None)
    cheap, dear = make_model("cheap", input_price="1", output_price="1"), make_model("dear", input_price="9",
                                                                                      output_price="9")
    agent = make_agent("poet", model=cheap)
    simulate_call(user, model=cheap.name, prompt=10, project="blog")
    simulate_call(user, model=dear.name, prompt=20)
    from usage.models import UsageRecord

    UsageRecord.objects.filter(model="cheap").update(agent=agent)
    from django.core.management import call_command

    today = timezone.now().astimezone(SHANGHAI).date()
    call_command("rebuild_rollups", "--since", str(today), "--until", str(today), stdout=io.StringIO())
    client = _auth(api_client, user)
    assert client.get("/api/usage/stats/?project=blog").json()["totals"]["total_tokens"] == 10
    assert client.get("/api/usage/stats/?agent=poet").json()["totals"]["total_tokens"] == 10
    by_model = client.get("/api/usage/stats/?model=dear").json()
    assert by_model["totals"]["total_tokens"] == 20 and by_model["totals"]["cost"] == "0.00018"
    assert client.get("/api/usage/records/?model=dear").json()["count"] == 1
