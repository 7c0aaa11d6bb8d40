"""Schemathesis against our own OpenAPI schema (/api/schema/): no 500, every response matches the schema.

The schema is loaded from the running app and every operation is called in process (Django's WSGI handler, so the
test's database transaction is shared), once as a normal user with an API key and once as staff. Examples are
bounded so the module finishes in about a minute on a loaded machine.
"""

from __future__ import annotations

import pytest
import schemathesis
from django.core.wsgi import get_wsgi_application
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

pytestmark = pytest.mark.django_db

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
# Per operation and role; ~60 operations x 2 roles x this stays around a minute.
MAX_EXAMPLES = 8
FUZZ = settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


# Loaded once at collection from the app itself (the schema view reads no data), one test item per operation.
schema = schemathesis.openapi.from_wsgi("/api/schema/", get_wsgi_application())


def _bearer(staff: bool) -> dict[str, str]:
    from tests.factories import make_agent, make_api_key, make_user

    user = make_user(staff=staff)
    make_agent("fuzz-agent")  # a known slug, so some agent routes get past the 404
    _, raw = make_api_key(user)
    return {"Authorization": f"Bearer {raw}"}


@pytest.fixture(autouse=True)
def _keep_the_test_connection():
    """As Django's test client does: a request must not close the connection that holds the test's transaction."""
    from django.core.signals import request_finished, request_started
    from django.db import close_old_connections

    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    yield
    request_started.connect(close_old_connections)
    request_finished.connect(close_old_connections)


@pytest.fixture
def user_headers(db):
    return _bearer(staff=False)


@pytest.fixture
def staff_headers(db):
    return _bearer(staff=True)


@schema.parametrize()
@FUZZ
def test_api_as_a_user_with_an_api_key(case, user_headers):
    case.call_and_validate(headers=user_headers, checks=CHECKS)


@schema.parametrize()
@FUZZ
def test_api_as_staff(case, staff_headers):
    case.call_and_validate(headers=staff_headers, checks=CHECKS)


# --- Hostile inputs no generator tries: NUL in every path parameter, a body nested far too deep -------------------

OPERATIONS = [(path, method) for path, item in schema.raw_schema["paths"].items()
              for method in item if method in ("get", "post", "put", "patch", "delete")]
DEEP_BODY = "[" * 100_000 + "]" * 100_000


def _with_nul(path: str) -> str:
    import re

    return re.sub(r"\{[^}]+\}", "a%00b", path)


@pytest.mark.pg  # PostgreSQL refuses NUL in text: only there does a NUL reaching a query give a 500
@pytest.mark.parametrize(("path", "method"), OPERATIONS)
def test_nul_in_path_and_deep_json_are_4xx_everywhere(path, method, staff_headers):
    from django.test import Client

    client = Client(headers=staff_headers)
    call = getattr(client, method)
    responses = []
    if "{" in path:
        responses.append(call(_with_nul(path)))
    if method in ("post", "put", "patch"):
        responses.append(call(path.replace("{", "").replace("}", ""), DEEP_BODY, content_type="application/json"))
    for response in responses:
        assert 400 <= response.status_code < 500, (response.status_code, response.content[:200])
        assert response.json()["error"]["code"]
