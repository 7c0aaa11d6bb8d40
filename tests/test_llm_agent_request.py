"""An agent becomes a request: placeholders filled at run time, its model, fallback, timeout and sampling."""

import time_machine
from django.utils import timezone

from agents.llm.agent_request import build_agent_request, render_system_prompt
from tests.factories import make_agent, make_model, make_user


def test_placeholders_are_filled_and_unknown_braces_stay(db):
    agent = make_agent(system_prompt="Hi {user}, project {project}, today {date}; keep {other} and {{x}}.")
    user = make_user("alice")
    with time_machine.travel("2026-03-04 10:00:00+00:00", tick=False):
        text = render_system_prompt(agent, user=user, project="atlas")
        assert f"today {timezone.localdate().isoformat()}" in text
    assert text.startswith("Hi alice, project atlas, today ")
    assert text.endswith("keep {other} and {x}.")


def test_a_stray_brace_leaves_the_prompt_as_written(db):
    agent = make_agent(system_prompt="Return JSON like {\"a\": 1")
    assert render_system_prompt(agent) == "Return JSON like {\"a\": 1"


def test_request_carries_the_agents_model_fallback_timeout_and_sampling(db):
    backup = make_model("backup-x")
    agent = make_agent(system_prompt="Be {user}'s helper.", fallback_model=backup, timeout_seconds=45,
                       max_tokens=300)
    request = build_agent_request(agent, [{"role": "system", "content": "ignored"},
                                          {"role": "user", "content": "hello"}], user=make_user("bob"))
    assert request.model == agent.model.name and request.fallback_model == "backup-x"
    assert request.timeout == 45.0 and request.max_tokens == 300 and request.temperature == 0.7
    assert request.messages == [{"role": "system", "content": "Be bob's helper."},
                                {"role": "user", "content": "hello"}]
    overridden = build_agent_request(agent, [{"role": "user", "content": "x"}], temperature=0, max_tokens=None)
    assert overridden.temperature == 0 and overridden.max_tokens == 300  # None leaves the agent's value


def test_agent_without_fallback_or_prompt(db):
    agent = make_agent(system_prompt="")
    request = build_agent_request(agent, [{"role": "user", "content": "x"}])
    assert request.fallback_model is None and request.timeout == 120.0
    assert request.messages == [{"role": "user", "content": "x"}]
