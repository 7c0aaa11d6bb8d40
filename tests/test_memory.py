"""Memory retrieval: the user's earlier messages most relevant to a text (full-text on PostgreSQL)."""

import pytest

from conversations.memory import search_memory
from conversations.models import Conversation, Message

pytestmark = pytest.mark.django_db


def _said(owner, agent, *texts, status="success"):
    conversation = Conversation.objects.create(owner=owner, agent=agent, project=f"p{Conversation.objects.count()}")
    for n, text in enumerate(texts, start=1):
        Message.objects.create(conversation=conversation, role="user", content=text, status=status, sequence=n)
    return conversation


def test_finds_the_users_relevant_messages_best_first(alice, bob, chat_agent):
    _said(alice, chat_agent, "My favourite colour is green", "I live in Lisbon near the river",
          "Green tea is my favourite drink")
    _said(alice, chat_agent, "the garden colour was blue", status="llm_error")  # failed: not memory
    _said(bob, chat_agent, "My favourite colour is purple")  # someone else's
    hits = search_memory(user=alice, query="What is my favourite colour?", k=2)
    assert [h.content for h in hits][0] == "My favourite colour is green"
    assert all("purple" not in h.content and "blue" not in h.content for h in hits)
    assert len(hits) == 2
    assert search_memory(user=alice, query="quantum chromodynamics") == []


def test_endpoint_returns_top_k(alice, alice_client, bob_client, chat_agent):
    _said(alice, chat_agent, "I adopted a cat named Pixel", "Pixel the cat likes boxes", "Weather is nice")
    body = alice_client.get("/api/memory/", {"q": "cat Pixel", "k": 1}).json()
    assert len(body["results"]) == 1 and "Pixel" in body["results"][0]["content"]
    assert set(body["results"][0]) == {"message", "conversation", "role", "content", "created_at", "rank"}
    assert bob_client.get("/api/memory/", {"q": "cat Pixel"}).json() == {"results": []}
    assert alice_client.get("/api/memory/").json()["error"]["code"] == "bad_request"
    assert alice_client.get("/api/memory/", {"q": "cat", "k": "x"}).status_code == 400


def test_relevant_memory_goes_into_the_system_prompt(alice, alice_client, chat_agent, fake_upstream):
    _said(alice, chat_agent, "My dog is called Biscuit")
    cid = alice_client.post("/api/conversations/", {"agent": "helper"}, format="json").json()["id"]
    alice_client.post(f"/api/conversations/{cid}/messages/", {"content": "What is my dog called?"}, format="json")
    system = fake_upstream.requests[-1]["body"]["messages"][0]
    assert system["role"] == "system" and system["content"].startswith("You help alice.")
    assert "My dog is called Biscuit" in system["content"]


@pytest.mark.pg
def test_postgresql_full_text_search_matches_word_forms(alice, chat_agent):
    """Stemming: "marathons" finds "marathon" and "runs" finds "Running"; a substring scan would not."""
    _said(alice, chat_agent, "I ran my first marathon in Berlin", "Running shoes are expensive",
          "My sister bakes bread")
    hits = search_memory(user=alice, query="marathons", k=5)
    assert [h.content for h in hits] == ["I ran my first marathon in Berlin"]
    assert [h.content for h in search_memory(user=alice, query="runs", k=5)] == ["Running shoes are expensive"]
    ranked = search_memory(user=alice, query="running a marathon in Berlin", k=5)
    assert ranked[0].content == "I ran my first marathon in Berlin" and ranked[0].rank >= ranked[-1].rank
    assert "bread" not in " ".join(h.content for h in ranked)
