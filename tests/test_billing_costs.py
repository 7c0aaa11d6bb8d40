"""Exact costs: hand-computed figures, tiny and huge token counts, sums, cached prices, price history."""

from datetime import timedelta
from decimal import Decimal

import pytest
from django.core.exceptions import ValidationError
from django.utils import timezone
from hypothesis import given, settings
from hypothesis import strategies as st

from aiwriter.money import Price, call_cost, money_str, to_cents
from tests.factories import make_model, make_user
from tests.fixtures_usage import simulate_call
from usage.billing.ledger import grant_credits
from usage.models import ModelPrice

GPT = Price(input=Decimal("2.5"), output=Decimal("10"), cached_input=Decimal("1.25"))


def test_hand_computed_cost():
    # 1234 prompt tokens at 2.5/M + 567 completion at 10/M = 0.003085 + 0.00567
    assert call_cost(GPT, prompt_tokens=1234, completion_tokens=567) == Decimal("0.008755")


def test_cached_prompt_tokens_at_cached_price():
    # 1000 prompt of which 400 cached: 600 * 2.5 + 400 * 1.25 = 2000 per million
    assert call_cost(GPT, prompt_tokens=1000, cached_prompt_tokens=400, completion_tokens=0) == Decimal("0.002")


def test_cached_price_missing_means_input_price():
    price = Price(input=Decimal("3"), output=Decimal("0"))
    assert call_cost(price, prompt_tokens=10, cached_prompt_tokens=10, completion_tokens=0) == Decimal("0.00003")


def test_one_token_on_the_cheapest_price_is_not_zero():
    cheapest = Price(input=Decimal("0.0001"), output=Decimal("0.0001"))
    assert call_cost(cheapest, prompt_tokens=0, completion_tokens=1) == Decimal("1E-10")


def test_huge_token_counts_stay_exact():
    price = Price(input=Decimal("9999.9999"), output=Decimal("10000"))
    cost = call_cost(price, prompt_tokens=10**12, completion_tokens=10**12 + 1)
    assert cost == Decimal("9999.9999") * 10**6 + Decimal("10000") * 10**6 + Decimal("0.01")


def test_whole_cents_and_decimal_strings():
    assert to_cents(Decimal("0.008755")) == 1 and to_cents(Decimal("0.0049999")) == 0
    assert to_cents(Decimal("12.345")) == 1235
    assert money_str(Decimal("0.0001590000")) == "0.000159" and money_str(Decimal("100")) == "100"


@settings(max_examples=200, deadline=None)
@given(
    prices=st.tuples(*[st.decimals(min_value=0, max_value=10000, places=4, allow_nan=False)] * 3),
    calls=st.lists(st.tuples(st.integers(0, 10**7), st.integers(0, 10**7)), min_size=1, max_size=30),
)
def test_sum_of_record_costs_equals_cost_of_summed_tokens(prices, calls):
    price = Price(input=prices[0], output=prices[1], cached_input=prices[2])
    per_record = sum(call_cost(price, prompt_tokens=p, completion_tokens=c) for p, c in calls)
    summed = call_cost(price, prompt_tokens=sum(p for p, _ in calls), completion_tokens=sum(c for _, c in calls))
    assert per_record == summed


@pytest.mark.django_db
def test_price_validation_refuses_negative_absurd_and_over_precise():
    model = make_model()
    for bad in ("-1", "10000.0001", "0.00001"):
        with pytest.raises(ValidationError):
            ModelPrice(model=model, input_per_million=Decimal(bad), output_per_million=0,
                       effective_from=timezone.now()).full_clean()
    ModelPrice(model=model, input_per_million=Decimal("2.5000"), output_per_million=Decimal("10"),
               effective_from=timezone.now()).full_clean()


@pytest.mark.django_db
def test_price_change_does_not_alter_past_costs():
    user = make_user()
    grant_credits(user=user, amount=Decimal("100"), reason="t", created_by=None)
    model = make_model(input_price="0", output_price="2")
    t0 = timezone.now()
    first = simulate_call(user, model=model.name, completion=1000, now=t0)
    ModelPrice.objects.create(model=model, input_per_million=0, output_per_million=Decimal("5"),
                              effective_from=t0 + timedelta(minutes=1))
    late_started = simulate_call(user, model=model.name, completion=1000, now=t0 + timedelta(seconds=30))
    after = simulate_call(user, model=model.name, completion=1000, now=t0 + timedelta(minutes=2))
    first.refresh_from_db()
    assert first.cost == Decimal("0.002") and late_started.cost == Decimal("0.002")
    assert after.cost == Decimal("0.005")


@pytest.mark.django_db
def test_staff_api_refuses_bad_prices_with_400_and_keeps_the_old_one(api_client):
    model = make_model("guarded", input_price="1", output_price="2")
    api_client.force_authenticate(make_user(staff=True))
    for field, bad in (("output_price_per_million", "10000.5"), ("input_price_per_million", "0.00001"),
                       ("output_price_per_million", "-1")):
        response = api_client.patch("/api/models/guarded/", {field: bad}, format="json")
        assert response.status_code == 400 and response.json()["error"]["code"] == "invalid", (field, bad)
        assert list(response.json()["error"]["fields"]) == [field]  # the request's field name, not the model's
    assert ModelPrice.objects.filter(model=model).count() == 1


@pytest.mark.django_db
def test_a_bad_price_cannot_be_saved_by_any_path():
    model = make_model()
    with pytest.raises(ValidationError):
        ModelPrice.objects.create(model=model, input_per_million=Decimal("50000"), output_per_million=0,
                                  effective_from=timezone.now())


@pytest.mark.django_db
def test_failed_call_keeps_the_providers_cost_on_its_record_but_is_neither_charged_nor_counted():
    from usage.models import CreditAccount, Quota, UsageCounter
    from usage.selectors import quota_status

    user = make_user()
    grant_credits(user=user, amount=Decimal("1"), reason="t", created_by=None)
    Quota.objects.create(user=user, monthly_token_limit=1000)
    model = make_model(input_price="2", output_price="8")
    record = simulate_call(user, model=model.name, prompt=500, status="error", billable=False)
    assert record.status == "error" and record.cost == Decimal("0.001") and not record.charged
    assert CreditAccount.objects.get(user=user).balance == 1
    assert quota_status(user=user)["usage"]["tokens"] == 0 and not UsageCounter.objects.filter(tokens__gt=0).exists()
