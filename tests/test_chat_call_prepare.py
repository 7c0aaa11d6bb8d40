"""Chat's model call goes through the pipeline's prepare (usage.pipeline.prepare_request): the context-window check
and the metering context with the conversation and its reply; the hold the exchange took is the call's."""

import ast
from pathlib import Path

import pytest

from conversations.models import Message
from tests.factories import make_agent, make_fake_model

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.django_db


def test_chat_prepares_its_call_through_the_pipeline_not_by_hand():
    tree = ast.parse((ROOT / "conversations" / "generation.py").read_text())
    called = {node.func.attr for node in ast.walk(tree)
              if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)}
    assert {"prepare_request", "run_stream", "finish_counted"} <= called
    assert "PreparedCall" not in called  # no call assembled by hand


def _send(client, conversation_id, content):
    return client.post(f"/api/conversations/{conversation_id}/messages/", {"content": content}, format="json")


def test_a_message_longer_than_the_window_is_refused_before_the_model_is_called(alice_client, fake_upstream):
    model = make_fake_model(fake_upstream, "tiny", context_window=60, max_output_tokens=20)
    agent = make_agent("tiny-agent", model=model, system_prompt="Short.")
    cid = alice_client.post("/api/conversations/", {"agent": agent.slug}, format="json").json()["id"]
    response = _send(alice_client, cid, "word " * 200)
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["retryable"] is False
    assert "maximum context length is 60 tokens" in error["message"]
    reply = Message.objects.get(pk=error["message_id"])
    assert reply.status == "llm_error" and reply.error_code == "context_length_exceeded"
    assert reply.reply_to.status == "llm_error" and reply.cost == 0
    assert fake_upstream.requests == []
    # A message that fits still gets its reply in the same conversation.
    assert _send(alice_client, cid, "Hello").status_code == 201
