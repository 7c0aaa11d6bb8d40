"""Fixtures for the chat tests (loaded from tests/conftest.py).

`live_server_daphne`: a real daphne process serving aiwriter.asgi against the test database.
Reusable by any test that needs a running server (websockets, /v1 over real HTTP, browser tests):

    @pytest.mark.pg
    def test_something(live_server_daphne):
        base = live_server_daphne               # "http://127.0.0.1:<port>"
        ws = base.replace("http", "ws", 1) + "/ws/chat/"

It needs PostgreSQL (the server process cannot see SQLite's in-memory test database) and uses a
transactional test database, so data the test creates is visible to the server. Extra environment
for the server process: override the `live_server_daphne_env` fixture (a dict) in a test module.
`second_live_server_daphne`: another daphne process on the same database and Redis (needs REDIS_URL),
for streams that cross processes through the channel layer.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import quote

import pytest
from django.conf import settings

_STARTUP_SECONDS = 30


def _database_url() -> str:
    from django.db import connection

    db = connection.settings_dict
    auth = quote(db.get("USER") or "", safe="")
    if db.get("PASSWORD"):
        auth += ":" + quote(db["PASSWORD"], safe="")
    host = db.get("HOST") or "127.0.0.1"
    port = db.get("PORT") or 5432
    return f"postgres://{auth}@{host}:{port}/{db['NAME']}"


@pytest.fixture
def live_server_daphne_env() -> dict[str, str]:
    """Extra environment variables for the daphne process; override in a test module to change."""
    return {}


@pytest.fixture
def live_server_daphne(transactional_db, live_server_daphne_env):
    """Starts daphne on a free loopback port against the test database; yields its base URL."""
    if not settings.IS_POSTGRES:
        pytest.skip("live_server_daphne needs PostgreSQL (DATABASE_URL)")
    with run_daphne(live_server_daphne_env) as base_url:
        yield base_url


@pytest.fixture
def second_live_server_daphne(live_server_daphne, live_server_daphne_env):
    """A second daphne process on the same database and Redis (several processes sharing one channel layer)."""
    if not settings.REDIS_URL:
        pytest.skip("two daphne processes share a stream only through Redis (REDIS_URL)")
    with run_daphne(live_server_daphne_env) as base_url:
        yield base_url


@contextmanager
def run_daphne(extra_env: dict[str, str] | None = None, daphne_args: list[str] | None = None) -> Iterator[str]:
    """A daphne process serving aiwriter.asgi on a free loopback port; yields its base URL, stops it after."""
    # Bind here and hand the listening socket to daphne (--fd): no race for the port.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.set_inheritable(True)
    port = sock.getsockname()[1]
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "DATABASE_URL": _database_url(),
        "REDIS_URL": settings.REDIS_URL,
        "REDIS_KEY_PREFIX": settings.REDIS_KEY_PREFIX,
        "DEBUG": "0",
        **(extra_env or {}),
    }
    log = tempfile.TemporaryFile()
    process = subprocess.Popen(
        [sys.executable, "-m", "aiwriter.serve", "--fd", str(sock.fileno()), *(daphne_args or []),
         "aiwriter.asgi:application"],
        cwd=str(settings.BASE_DIR), env=env, pass_fds=[sock.fileno()], stdout=log, stderr=subprocess.STDOUT,
    )
    sock.close()
    base_url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_healthy(base_url, process, log)
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
        log.close()


def _wait_until_healthy(base_url: str, process: subprocess.Popen, log) -> None:
    deadline = time.monotonic() + _STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            with urllib.request.urlopen(base_url + "/healthz", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)
    log.seek(0)
    output = log.read().decode(errors="replace")[-4000:]
    raise RuntimeError(f"daphne did not become healthy at {base_url}:\n{output}")


@pytest.fixture
def chat_model(db, fake_upstream):
    """A free model served by the fake upstream (upstream name = model name)."""
    from tests.factories import make_fake_model

    return make_fake_model(fake_upstream, "chat-model")


@pytest.fixture
def chat_agent(chat_model):
    from tests.factories import make_agent

    return make_agent("helper", model=chat_model, system_prompt="You help {user}.")


@pytest.fixture
def alice(db):
    from tests.factories import make_user

    return make_user("alice")


@pytest.fixture
def bob(db):
    from tests.factories import make_user

    return make_user("bob")


@pytest.fixture
def alice_client(alice):
    from rest_framework.test import APIClient

    client = APIClient()
    client.force_authenticate(alice)
    return client


@pytest.fixture
def bob_client(bob):
    from rest_framework.test import APIClient

    client = APIClient()
    client.force_authenticate(bob)
    return client


@pytest.fixture
def no_redis(settings):
    """Runs the test as if REDIS_URL were unset: locks, limits and sequence numbers fall back to the database."""
    from aiwriter import redis as shared_redis

    settings.REDIS_URL = ""
    shared_redis.get_redis.cache_clear()
    yield
    shared_redis.get_redis.cache_clear()
