"""An agent becomes a request: placeholders filled at run time, its model, fallback, timeout and sampling;
max_tokens within the model's max_output_tokens."""

import pytest
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


def test_max_tokens_is_capped_by_the_models_max_output_tokens(db):
    agent = make_agent(model=make_model(max_output_tokens=100), max_tokens=300)  # stored before validation existed
    assert build_agent_request(agent, [{"role": "user", "content": "x"}]).max_tokens == 100
    assert build_agent_request(agent, [{"role": "user", "content": "x"}], max_tokens=5000).max_tokens == 100
    assert build_agent_request(agent, [{"role": "user", "content": "x"}], max_tokens=40).max_tokens == 40
    unset = make_agent(model=agent.model)
    assert build_agent_request(unset, [{"role": "user", "content": "x"}]).max_tokens is None  # the upstream's default


def test_an_agents_max_tokens_must_fit_its_model(db):
    from django.core.exceptions import ValidationError

    agent = make_agent(model=make_model(max_output_tokens=1000))
    for bad in (1001, 0):
        agent.max_tokens = bad
        with pytest.raises(ValidationError) as info:
            agent.full_clean()
        assert "max_tokens" in info.value.message_dict
    for good in (1000, 1, None):
        agent.max_tokens = good
        agent.full_clean()


def test_the_staff_api_refuses_max_tokens_above_the_models(api_client, db):
    from agents.models import Agent

    api_client.force_authenticate(make_user(staff=True))
    make_model("small-out", max_output_tokens=1000)
    make_model("big-out", max_output_tokens=8000)
    body = {"slug": "w", "name": "W", "model": "small-out", "max_tokens": 5000}
    response = api_client.post("/api/agents/", body, format="json")
    error = response.json()["error"]
    assert response.status_code == 400 and error["code"] == "invalid" and "max_tokens" in error["fields"]
    assert not Agent.objects.exists()
    assert api_client.post("/api/agents/", {**body, "model": "big-out"}, format="json").status_code == 201
    moved = api_client.patch("/api/agents/w/", {"model": "small-out"}, format="json")  # 5000 no longer fits
    assert moved.status_code == 400 and "max_tokens" in moved.json()["error"]["fields"]
    fixed = api_client.patch("/api/agents/w/", {"model": "small-out", "max_tokens": 1000}, format="json")
    assert fixed.status_code == 200 and fixed.json()["max_tokens"] == 1000
