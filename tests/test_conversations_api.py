"""/api/conversations/: create with dedupe, list filter, detail, update, soft delete, and BOLA everywhere."""

from datetime import timedelta

import pytest
from django.utils import timezone

from conversations.models import Conversation, Message
from tests.factories import make_agent

pytestmark = pytest.mark.django_db


def _create(client, agent, **body):
    return client.post("/api/conversations/", {"agent": agent.slug, **body}, format="json")


def test_create_returns_201_then_the_same_conversation_with_200_within_5_minutes(alice_client, chat_agent):
    first = _create(alice_client, chat_agent, project="p1")
    again = _create(alice_client, chat_agent, project="p1")
    assert first.status_code == 201 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"] and again.json()["agent"] == "helper"
    assert Conversation.objects.count() == 1


def test_a_deduplicated_create_says_so_and_keeps_the_first_title(alice_client, chat_agent):
    first = _create(alice_client, chat_agent, title="Spring poem")
    again = _create(alice_client, chat_agent, title="Autumn essay")
    assert first.status_code == 201 and first.json()["deduplicated"] is False
    assert first["X-Conversation-Deduplicated"] == "false"
    assert again.status_code == 200 and again.json()["deduplicated"] is True
    assert again["X-Conversation-Deduplicated"] == "true"
    assert again.json()["title"] == "Spring poem"  # the second title is not applied: the flag says why


def test_dedupe_ends_after_5_minutes(alice_client, chat_agent):
    first = _create(alice_client, chat_agent).json()["id"]
    Conversation.objects.filter(pk=first).update(created_at=timezone.now() - timedelta(minutes=5, seconds=1))
    second = _create(alice_client, chat_agent)
    assert second.status_code == 201 and second.json()["id"] != first


def test_dedupe_is_per_user_agent_and_project(alice_client, bob_client, chat_agent, chat_model):
    other_agent = make_agent("other", model=chat_model)
    ids = {_create(alice_client, chat_agent).json()["id"], _create(alice_client, chat_agent, project="x").json()["id"],
           _create(alice_client, other_agent).json()["id"], _create(bob_client, chat_agent).json()["id"]}
    assert len(ids) == 4


def test_unknown_agent_is_a_400(alice_client, db):
    response = alice_client.post("/api/conversations/", {"agent": "nobody"}, format="json")
    assert response.status_code == 400 and response.json()["error"]["code"] == "unknown_agent"


def test_list_shows_only_conversations_with_a_successful_reply_newest_first(alice, alice_client, chat_agent,
                                                                           fake_upstream):
    empty = Conversation.objects.create(owner=alice, agent=chat_agent)
    failed = Conversation.objects.create(owner=alice, agent=chat_agent, project="f")
    Message.objects.create(conversation=failed, role="assistant", status="llm_error", sequence=1)
    older = _create(alice_client, chat_agent, project="a").json()["id"]
    newer = _create(alice_client, chat_agent, project="b").json()["id"]
    for cid in (newer, older):  # `older` gets the latest activity
        assert alice_client.post(f"/api/conversations/{cid}/messages/", {"content": "hi"},
                                 format="json").status_code == 201
    body = alice_client.get("/api/conversations/").json()
    assert [c["id"] for c in body["results"]] == [older, newer] and body["count"] == 2
    assert empty.pk not in [c["id"] for c in body["results"]]
    page = alice_client.get("/api/conversations/?limit=1").json()
    assert len(page["results"]) == 1 and page["next"]


def test_include_failed_lists_failed_and_stopped_conversations_too(alice, bob, alice_client, chat_agent):
    failed = Conversation.objects.create(owner=alice, agent=chat_agent, title="Failed one")
    Message.objects.create(conversation=failed, role="assistant", status="llm_error", sequence=1)
    good = Conversation.objects.create(owner=alice, agent=chat_agent, title="Good one", has_success=True)
    deleted = Conversation.objects.create(owner=alice, agent=chat_agent, title="Gone", deleted_at=timezone.now())
    Conversation.objects.create(owner=bob, agent=chat_agent, title="Bob's")
    ids = [c["id"] for c in alice_client.get("/api/conversations/?include_failed=true").json()["results"]]
    assert sorted(ids) == sorted([failed.pk, good.pk]) and deleted.pk not in ids
    assert [c["id"] for c in alice_client.get("/api/conversations/").json()["results"]] == [good.pk]
    bad = alice_client.get("/api/conversations/?include_failed=maybe")
    assert bad.status_code == 400 and bad.json()["error"]["code"]


def test_search_matches_titles_and_message_text_of_ones_own_conversations_only(alice, bob, alice_client, bob_client,
                                                                               chat_agent):
    by_title = Conversation.objects.create(owner=alice, agent=chat_agent, title="Trip to Lisbon", has_success=True)
    by_text = Conversation.objects.create(owner=alice, agent=chat_agent, title="Untitled", has_success=True)
    Message.objects.create(conversation=by_text, role="user", status="success", sequence=1,
                           content="What to eat in LISBON?")
    Conversation.objects.create(owner=alice, agent=chat_agent, title="Cats", has_success=True)
    bobs = Conversation.objects.create(owner=bob, agent=chat_agent, title="Lisbon for Bob", has_success=True)
    found = alice_client.get("/api/conversations/?q=lisbon&include_failed=true").json()
    assert sorted(c["id"] for c in found["results"]) == sorted([by_title.pk, by_text.pk]) and found["count"] == 2
    assert [c["id"] for c in bob_client.get("/api/conversations/?q=lisbon").json()["results"]] == [bobs.pk]
    assert alice_client.get("/api/conversations/?q=nothing-like-this").json()["count"] == 0
    assert alice_client.get("/api/conversations/?q=" + "x" * 201).status_code == 400


def test_bob_cannot_rename_or_delete_alices_conversation(alice, alice_client, bob_client, chat_agent):
    conversation = Conversation.objects.create(owner=alice, agent=chat_agent, title="Alice's", has_success=True)
    assert bob_client.patch(f"/api/conversations/{conversation.pk}/", {"title": "Bob's now"},
                            format="json").status_code == 404
    assert bob_client.delete(f"/api/conversations/{conversation.pk}/").status_code == 404
    conversation.refresh_from_db()
    assert conversation.title == "Alice's" and conversation.deleted_at is None
    renamed = alice_client.patch(f"/api/conversations/{conversation.pk}/", {"title": "Renamed"}, format="json")
    assert renamed.status_code == 200 and renamed.json()["title"] == "Renamed"


def test_detail_update_and_soft_delete(alice_client, chat_agent):
    cid = _create(alice_client, chat_agent, title="Draft").json()["id"]
    assert alice_client.get(f"/api/conversations/{cid}/").json()["title"] == "Draft"
    patched = alice_client.patch(f"/api/conversations/{cid}/", {"title": "Final"}, format="json")
    assert patched.json()["title"] == "Final"
    assert alice_client.delete(f"/api/conversations/{cid}/").status_code == 204
    assert Conversation.objects.get(pk=cid).deleted_at is not None
    assert alice_client.get(f"/api/conversations/{cid}/").status_code == 404
    assert _create(alice_client, chat_agent).json()["id"] != cid  # a deleted conversation is not reused


def test_bob_gets_404_for_everything_of_alices(alice_client, bob_client, chat_agent, fake_upstream):
    cid = _create(alice_client, chat_agent).json()["id"]
    fake_upstream.configure("chat-model", status=500)
    failed = alice_client.post(f"/api/conversations/{cid}/messages/", {"content": "hi"}, format="json")
    mid = failed.json()["error"]["message_id"]
    calls = len(fake_upstream.requests)
    for method, url, body in [
        ("get", f"/api/conversations/{cid}/", None),
        ("patch", f"/api/conversations/{cid}/", {"title": "mine"}),
        ("delete", f"/api/conversations/{cid}/", None),
        ("get", f"/api/conversations/{cid}/messages/", None),
        ("post", f"/api/conversations/{cid}/messages/", {"content": "hi"}),
        ("post", f"/api/conversations/{cid}/messages/{mid}/retry/", None),
    ]:
        response = getattr(bob_client, method)(url, body, format="json")
        assert response.status_code == 404, (method, url)
        assert response.json()["error"]["code"] == "not_found"
    assert bob_client.get("/api/conversations/").json()["count"] == 0
    # Nor through his own conversation: a message id is looked up inside the conversation in the URL.
    bobs = bob_client.post("/api/conversations/", {"agent": chat_agent.slug}, format="json").json()["id"]
    response = bob_client.post(f"/api/conversations/{bobs}/messages/{mid}/retry/")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    conversation = Conversation.objects.get(pk=cid)
    assert conversation.title != "mine" and conversation.deleted_at is None and conversation.message_count == 2
    assert len(fake_upstream.requests) == calls


def test_anonymous_requests_are_refused(client, db):
    assert client.get("/api/conversations/").status_code in (401, 403)


def test_a_key_limited_to_other_models_cannot_chat_with_this_agent(alice, alice_client, chat_agent, chat_model,
                                                                   fake_upstream):
    from rest_framework.test import APIClient

    from tests.factories import make_api_key, make_fake_model

    other = make_fake_model(fake_upstream, "other-model")
    limited, limited_raw = make_api_key(alice, name="limited")
    limited.allowed_models.add(other)
    allowed, allowed_raw = make_api_key(alice, name="allowed")
    allowed.allowed_models.add(chat_model, other)
    cid = _create(alice_client, chat_agent).json()["id"]  # a session may use every agent
    fake_upstream.configure("chat-model", status=500)
    failed = alice_client.post(f"/api/conversations/{cid}/messages/", {"content": "hi"}, format="json")
    mid = failed.json()["error"]["message_id"]
    fake_upstream.reset()

    key_client = APIClient()
    key_client.credentials(HTTP_AUTHORIZATION=f"Bearer {limited_raw}")
    for url, body in [("/api/conversations/", {"agent": "helper", "project": "k"}),
                      (f"/api/conversations/{cid}/messages/", {"content": "hello"}),
                      (f"/api/conversations/{cid}/messages/{mid}/retry/", None)]:
        response = key_client.post(url, body, format="json")
        assert response.status_code == 400 and response.json()["error"]["code"] == "unknown_agent", url
    assert fake_upstream.requests == [] and Conversation.objects.count() == 1

    key_client.credentials(HTTP_AUTHORIZATION=f"Bearer {allowed_raw}")
    assert key_client.post(f"/api/conversations/{cid}/messages/", {"content": "hello"}, format="json"
                           ).status_code == 201


def test_new_true_always_starts_a_new_conversation_and_later_dedupes_find_it(alice_client, chat_agent):
    first = _create(alice_client, chat_agent, project="p1").json()["id"]
    fresh = _create(alice_client, chat_agent, project="p1", new=True)
    assert fresh.status_code == 201 and fresh.json()["id"] != first
    assert _create(alice_client, chat_agent, project="p1", new=True).json()["id"] not in (first, fresh.json()["id"])
    latest = Conversation.objects.order_by("-created_at", "-id").first().pk
    again = _create(alice_client, chat_agent, project="p1")  # the contract for clients without `new`: unchanged
    assert again.status_code == 200 and again.json()["id"] == latest
    assert _create(alice_client, chat_agent, project="p1", new=False).json()["id"] == latest
    assert Conversation.objects.count() == 3


def test_new_must_be_a_boolean(alice_client, chat_agent):
    response = _create(alice_client, chat_agent, new="sometimes")
    assert response.status_code == 400 and "new" in response.json()["error"]["fields"]


def test_a_limited_key_falls_back_only_to_a_model_it_may_use(alice, chat_model, fake_upstream, settings):
    from rest_framework.test import APIClient

    from tests.factories import make_agent, make_api_key, make_fake_model

    settings.LLM_RETRY_BASE_DELAY = 0.001
    backup = make_fake_model(fake_upstream, "backup-model")
    agent = make_agent("with-backup", model=chat_model, fallback_model=backup)
    fake_upstream.configure("chat-model", status=500)
    limited, limited_raw = make_api_key(alice, name="limited")
    limited.allowed_models.add(chat_model)
    both, both_raw = make_api_key(alice, name="both")
    both.allowed_models.add(chat_model, backup)

    replies = {}
    for name, raw in (("limited", limited_raw), ("both", both_raw)):
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
        cid = client.post("/api/conversations/", {"agent": agent.slug, "project": name}, format="json").json()["id"]
        replies[name] = client.post(f"/api/conversations/{cid}/messages/", {"content": "hi"}, format="json")
    assert replies["limited"].status_code == 502  # no fallback to a model the key may not use
    assert replies["both"].status_code == 201 and replies["both"].json()["fallback"] is True
    assert [r["model"] for r in fake_upstream.requests].count("backup-model") == 1
