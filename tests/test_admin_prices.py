"""Model prices in the admin: a change adds a row to the history; past rows stay as they were."""

from __future__ import annotations

import re
from datetime import timedelta
from decimal import Decimal

import pytest
from django.urls import reverse
from django.utils import timezone

from tests.factories import make_model
from tests.fixtures_web import form_data
from usage.models import ModelPrice

pytestmark = pytest.mark.django_db


def _change_page(client, model):
    url = reverse("admin:agents_llmmodel_change", args=[model.pk])
    response = client.get(url)
    assert response.status_code == 200
    return url, response


def test_model_page_shows_deployments_and_price_history(operator_client):
    model = make_model("gpt-x", input_price="1.5", output_price="6")
    _, response = _change_page(operator_client, model)
    body = response.content.decode()
    assert 'id="deployments-group"' in body
    assert 'id="prices-group"' in body
    past = body.split('id="prices-0"')[1].split("</tr>")[0]
    # The past row in the one money format (aiwriter.money), as the rest of the admin: not 1.5000000000.
    assert re.search(r'field-input_per_million">\s*<p>1\.5</p>', past)
    assert re.search(r'field-output_per_million">\s*<p>6</p>', past)
    assert "0000" not in body.split('id="prices-group"')[1].split("</fieldset>")[0]
    # The past row is shown read-only: no input for its price.
    assert 'name="prices-0-input_per_million"' not in body
    assert 'name="prices-1-input_per_million"' in body  # the empty row for a new price


def test_changing_a_price_adds_a_row_and_keeps_the_old_one(operator_client):
    model = make_model("gpt-x", input_price="1.5", output_price="6")
    old = model.prices.get()
    url, response = _change_page(operator_client, model)
    data = form_data(response.content, "llmmodel_form")
    data.update({"prices-1-input_per_million": "2", "prices-1-output_per_million": "8",
                 "prices-1-effective_from_0": timezone.localdate().isoformat(),
                 "prices-1-effective_from_1": timezone.localtime().strftime("%H:%M:%S")})
    response = operator_client.post(url, data)
    assert response.status_code == 302, response.content.decode()[:3000]
    prices = list(model.prices.order_by("effective_from"))
    assert len(prices) == 2
    assert (prices[0].pk, prices[0].input_per_million, prices[0].output_per_million) == (
        old.pk, Decimal("1.5"), Decimal("6"))
    assert (prices[1].input_per_million, prices[1].output_per_million) == (Decimal("2"), Decimal("8"))


def test_posting_new_values_for_a_past_row_changes_nothing(operator_client):
    model = make_model("gpt-x", input_price="1.5", output_price="6")
    old = model.prices.get()
    url, response = _change_page(operator_client, model)
    data = form_data(response.content, "llmmodel_form")
    data.update({"prices-0-id": str(old.pk), "prices-0-input_per_million": "0", "prices-0-output_per_million": "0",
                 "prices-0-DELETE": "on"})
    assert operator_client.post(url, data).status_code == 302
    old.refresh_from_db()
    assert (old.input_per_million, old.output_per_million) == (Decimal("1.5"), Decimal("6"))
    assert ModelPrice.objects.filter(model=model).count() == 1


def test_a_negative_price_is_refused(operator_client):
    model = make_model("gpt-x", input_price="1", output_price="1")
    url, response = _change_page(operator_client, model)
    data = form_data(response.content, "llmmodel_form")
    data.update({"prices-1-input_per_million": "-1", "prices-1-output_per_million": "1",
                 "prices-1-effective_from_0": timezone.localdate().isoformat(),
                 "prices-1-effective_from_1": "00:00:00"})
    response = operator_client.post(url, data)
    assert response.status_code == 200  # the form again, with the error
    assert model.prices.count() == 1


def test_changelist_shows_the_price_in_force(operator_client):
    model = make_model("gpt-x", input_price="1", output_price="2")
    ModelPrice.objects.create(model=model, input_per_million=Decimal("9"), output_per_million=Decimal("9"),
                              effective_from=timezone.now() + timedelta(days=3))  # scheduled, not yet in force
    response = operator_client.get(reverse("admin:agents_llmmodel_changelist"))
    assert "1 / 2" in response.content.decode()
