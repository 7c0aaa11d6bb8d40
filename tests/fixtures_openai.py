"""Fixtures for the /v1 and writer tests (loaded from tests/conftest.py).

`openai_account`: a user with credit, an API key and its raw secret (`.user`, `.key`, `.raw`,
`.auth` = the Authorization header value). `fake_gpt`: a priced model "fake-gpt" served by the
`fake_upstream` test server.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import pytest

from tests.factories import make_api_key, make_fake_model, make_user

FAKE_GPT_INPUT_PRICE = "2"  # per million tokens
FAKE_GPT_OUTPUT_PRICE = "8"


@dataclass
class Account:
    user: Any
    key: Any
    raw: str

    @property
    def auth(self) -> str:
        return f"Bearer {self.raw}"


def fund(user: Any, amount: str = "100") -> None:
    """Gives the user credit through the usage app's service."""
    from usage.billing.ledger import grant_credits

    grant_credits(user=user, amount=Decimal(amount), reason="test credit", created_by=None)


def make_account(username: str | None = None, *, credit: str | None = "100", **key_fields: Any) -> Account:
    user = make_user(username)
    if credit is not None:
        fund(user, credit)
    key, raw = make_api_key(user)
    allowed = key_fields.pop("allowed_models", None)
    for name, value in key_fields.items():
        setattr(key, name, value)
    if key_fields:
        key.save()
    if allowed:
        key.allowed_models.set(allowed)
    return Account(user=user, key=key, raw=raw)


@pytest.fixture(autouse=True)
def _fresh_key_rate_counters():
    """Key rate limits count in this process when REDIS_URL is unset (conftest flushes Redis otherwise);
    a new test must not inherit the last one's counts, as primary keys repeat between tests."""
    from usage import keylimits

    keylimits.local_counters.clear()
    yield


def start_of_a_fresh_minute(margin: float = 3.0) -> None:
    """Key rate limits count in one-minute windows: a test that must stay inside one window waits out
    the last seconds of the current minute rather than straddle two."""
    into_minute = time.time() % 60
    if into_minute > 60 - margin:
        time.sleep(60 - into_minute + 0.05)


@pytest.fixture
def openai_account(transactional_db) -> Account:
    return make_account()


@pytest.fixture
def fake_gpt(transactional_db, fake_upstream):
    return make_fake_model(fake_upstream, "fake-gpt", input_price=FAKE_GPT_INPUT_PRICE,
                           output_price=FAKE_GPT_OUTPUT_PRICE)


@pytest.fixture
async def close_thread_connections():
    """Async tests reach the ORM through sync_to_async's worker thread; close its connection at the end
    so PostgreSQL can drop the test database."""
    yield
    from asgiref.sync import sync_to_async
    from django.db import connections

    await sync_to_async(connections.close_all)()
