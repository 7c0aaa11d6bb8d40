"""The writer endpoints under a live daphne: a sync DRF view making its async metered call."""

from __future__ import annotations

import httpx2
import pytest

from aiwriter.money import money_str
from usage.models import UsageRecord

pytestmark = [pytest.mark.pg, pytest.mark.django_db(transaction=True)]


def test_topics_under_daphne(live_server_daphne, openai_account, fake_gpt, fake_upstream):
    fake_upstream.configure("fake-gpt", reply="Green tea\nBlack tea")
    response = httpx2.post(f"{live_server_daphne}/api/ai/topics/", json={"subject": "tea", "model": "fake-gpt"},
                           headers={"Authorization": openai_account.auth}, timeout=20)
    assert response.status_code == 200, response.text
    assert response.json()["topics"] == ["Green tea", "Black tea"]
    record = UsageRecord.objects.get(api_key=openai_account.key)
    assert record.entry_point == "writer" and response.json()["cost"] == money_str(record.cost)
