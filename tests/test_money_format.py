"""One money format everywhere (docs/usage-and-billing.md): a plain decimal, trailing zeros stripped, never an
exponent — the same string on /api messages, websocket `done` frames, /v1 headers and usage records."""

from decimal import Decimal

import pytest

from aiwriter.money import money_str
from conversations.generation import done_frame
from conversations.models import Message
from conversations.serializers import MessageSerializer
from tests.factories import make_agent, make_fake_model

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize(("stored", "shown"), [
    (Decimal("0.0005725000"), "0.0005725"), (Decimal("0E-10"), "0"), (Decimal("0"), "0"),
    (Decimal("2.5000000000"), "2.5"), (Decimal("100.0000000000"), "100"), (Decimal("1E-10"), "0.0000000001"),
    (Decimal("12345678901234.0000000001"), "12345678901234.0000000001"),
])
def test_money_str_is_plain_and_trimmed(stored, shown):
    assert money_str(stored) == shown


def test_a_message_and_its_done_frame_show_cost_in_the_one_format(alice_client, alice, fake_upstream):
    from usage.billing.ledger import grant_credits

    grant_credits(user=alice, amount=Decimal("5"), reason="test", created_by=None)
    agent = make_agent("priced", model=make_fake_model(fake_upstream, "priced-model", input_price="1.5",
                                                       output_price="2"))
    cid = alice_client.post("/api/conversations/", {"agent": agent.slug}, format="json").json()["id"]
    body = alice_client.post(f"/api/conversations/{cid}/messages/", {"content": "Hello"}, format="json").json()
    reply = Message.objects.get(pk=body["id"])
    assert reply.cost > 0
    assert body["cost"] == money_str(reply.cost) and not body["cost"].endswith("0") and "E" not in body["cost"]
    assert done_frame(reply)["cost"] == body["cost"]
    listed = alice_client.get(f"/api/conversations/{cid}/messages/").json()["results"]
    assert [m["cost"] for m in listed] == ["0", body["cost"]]  # a free user message is "0", not "0E-10"


def test_a_zero_cost_reply_is_zero_not_an_exponent(alice):
    from conversations.models import Conversation

    conversation = Conversation.objects.create(owner=alice, agent=make_agent("free"))
    reply = Message.objects.create(conversation=conversation, role="assistant", status="success", sequence=2,
                                   cost=Decimal("0E-10"))
    reply.refresh_from_db()
    assert MessageSerializer(reply).data["cost"] == "0" and done_frame(reply)["cost"] == "0"
