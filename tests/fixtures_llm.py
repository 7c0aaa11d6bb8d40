"""Fixtures for the llm tests (loaded from tests/conftest.py)."""

from __future__ import annotations

import pytest

from devtools.fake_openai import FakeOpenAI


@pytest.fixture(scope="session")
def _fake_upstream_server():
    server = FakeOpenAI().start_in_thread("127.0.0.1", 0)
    yield server
    server.stop_thread()


@pytest.fixture
def fake_upstream(_fake_upstream_server):
    """The OpenAI-compatible test upstream (devtools/fake_openai.py), knobs and logs reset per test.

    `.base_url` (".../v1"), `.configure(upstream_model, **knobs)`, `.requests`, `.served[model]`.
    Create a model served by it with `tests.factories.make_fake_model(fake_upstream, "name")`.
    """
    _fake_upstream_server.reset()
    yield _fake_upstream_server
    _fake_upstream_server.reset()


@pytest.fixture(autouse=True)
def _fresh_llm_state(_clean_shared_state):
    """Each test starts with an empty route cache, balancer, breakers, health, limits, response cache, metrics."""
    from agents.llm.service import reset_state

    reset_state()
    yield
    reset_state()  # so no leftover metrics get flushed to Redis after the next test's flushdb
