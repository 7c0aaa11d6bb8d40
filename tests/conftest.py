from __future__ import annotations

import os

import pytest
from django.conf import settings

pytest_plugins = [
    "tests.fixtures_llm",
    "tests.fixtures_usage",
    "tests.fixtures_chat",
    "tests.fixtures_openai",
    "tests.fixtures_web",
    "tests.fixtures_faults",
]

_left_out: dict[str, int] = {"pg": 0, "redis": 0}


def pytest_collection_modifyitems(config, items):
    require = os.environ.get("CI_REQUIRE_SERVICES") == "1"
    have = {"pg": settings.IS_POSTGRES, "redis": bool(settings.REDIS_URL)}
    if require and not all(have.values()):
        raise pytest.UsageError("CI_REQUIRE_SERVICES=1 but DATABASE_URL/REDIS_URL do not point at PostgreSQL/Redis")
    for item in items:
        # schemathesis 4 builds its per-operation items without a callspec, and pytest 9 derives a node id from
        # the function's original name and the callspec: all ~100 fuzz items shared 2 ids, so pytest counted 2
        # distinct tests and its progress stopped at [ 86%] (issue 15). The item's name carries the operation.
        if item.name.endswith("]") and "[" in item.name and "[" not in item.nodeid:
            item._id = item._id.with_params(item.name[item.name.index("[") + 1:-1])
        for marker, available in have.items():
            if item.get_closest_marker(marker) and not available:
                _left_out[marker] += 1
                item.add_marker(pytest.mark.skip(reason=f"needs {'PostgreSQL' if marker == 'pg' else 'Redis'}"))
                break


def pytest_terminal_summary(terminalreporter):
    if any(_left_out.values()):
        terminalreporter.write_line(
            f"bare run: left out {_left_out['pg']} PostgreSQL and {_left_out['redis']} Redis tests "
            "(set DATABASE_URL and REDIS_URL, as .ci/run does, to run them)"
        )


@pytest.fixture(autouse=True)
def _clean_shared_state():
    """Each test starts with an empty cache and, when configured, an empty Redis database."""
    from django.core.cache import cache

    cache.clear()
    if settings.REDIS_URL:
        from aiwriter.redis import get_redis

        get_redis().flushdb()
    yield


@pytest.fixture(autouse=True)
def _async_pool_per_test(request):
    """The hot path's async pool (aiwriter.dbpool) uses its own connections, which cannot see the rows of a
    test wrapped in a transaction: such tests take the sync path. Each test's pools are closed after it (its
    event loop is gone), so the test database can be dropped."""
    from aiwriter import dbpool

    marker = request.node.get_closest_marker("django_db")
    wrapped = marker is not None and not (marker.kwargs.get("transaction") or (marker.args and marker.args[0]))
    previous = getattr(settings, "DB_ASYNC_POOL", False)
    if wrapped:
        settings.DB_ASYNC_POOL = False
    yield
    settings.DB_ASYNC_POOL = previous
    dbpool.close_all()


@pytest.fixture
def api_client():
    from rest_framework.test import APIClient

    return APIClient()
