"""A reply's tokens, estimated flag and cost are its usage record's, whatever way the reply ended: the record is
what was billed, so the message can never tell another count (conversations/generation.py usage_fields)."""

import asyncio
from decimal import Decimal

import pytest
from asgiref.sync import sync_to_async

from conversations import services
from conversations.generation import run_exchange
from conversations.models import Conversation, Message
from tests.factories import make_agent, make_fake_model
from usage.billing.ledger import grant_credits
from usage.models import UsageRecord

pytestmark = [pytest.mark.pg, pytest.mark.django_db(transaction=True)]

MODEL = "recorded-model"


@pytest.fixture
def priced(alice, fake_upstream):
    model = make_fake_model(fake_upstream, MODEL, input_price="3", output_price="7")
    grant_credits(user=alice, amount=Decimal("100"), reason="test", created_by=None)
    return make_agent("recorded", model=model)


async def _run(alice, agent, *, cancel_on_delta: bool = False) -> Message:
    conversation = await Conversation.objects.acreate(owner=alice, agent=agent)
    exchange = await sync_to_async(services.begin_exchange)(user=alice, conversation=conversation,
                                                             content="tell me a long story")
    delta = asyncio.Event()

    async def emit(frame):
        if frame["type"] == "delta":
            delta.set()

    task = asyncio.ensure_future(run_exchange(exchange, user=alice, entry_point="chat", emit=emit))
    if cancel_on_delta:
        await asyncio.wait_for(delta.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    else:
        await task
    return await Message.objects.aget(pk=exchange.reply.pk)


def _assert_same_as_record(reply: Message) -> UsageRecord:
    record = UsageRecord.objects.get(message_id=reply.pk)
    assert (reply.prompt_tokens, reply.completion_tokens, reply.usage_estimated, reply.cost) == (
        record.prompt_tokens, record.completion_tokens, record.token_source != "measured", record.cost)
    return record


def test_a_successful_reply_has_its_records_counts(alice, priced, fake_upstream):
    fake_upstream.configure(MODEL, tokens=20)
    reply = asyncio.run(_run(alice, priced))
    assert reply.status == "success"
    record = _assert_same_as_record(reply)
    assert record.cost > 0 and record.token_source == "measured"


def test_a_cancelled_reply_has_its_records_counts(alice, priced, fake_upstream):
    fake_upstream.configure(MODEL, tokens=80, chunk_delay=0.02)
    reply = asyncio.run(_run(alice, priced, cancel_on_delta=True))
    assert reply.status == "error" and reply.error_code == "cancelled" and reply.content
    record = _assert_same_as_record(reply)
    assert record.status == "cancelled" and record.cost > 0


def test_an_upstream_error_after_partial_output_has_its_records_counts(alice, priced, fake_upstream):
    fake_upstream.configure(MODEL, tokens=200, cut_after=3)
    reply = asyncio.run(_run(alice, priced))
    assert reply.status == "llm_error" and reply.content
    record = _assert_same_as_record(reply)
    assert record.status == "error" and record.cost > 0
