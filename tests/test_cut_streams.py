"""Streams cut at 0, 1, 5 and 50 chunks, by the upstream or by the client, on /v1 and on /ws/chat/.

Each cell drives a live daphne (one per module) with a real client: the openai SDK for
`/v1/chat/completions` (stream=true) and a `websockets` client for `/ws/chat/`. The fake upstream
cuts the stream itself (`cut_after=N`: N content chunks, then the connection is dropped; 0 = it dies
before the first delta), or the client reads N deltas and closes (0 = it leaves while the upstream is
still thinking). The billing policy is the default `CUTOFF_BILLING_POLICY = "delivered"`
(docs/usage-and-billing.md): one usage record per call; `partial`, charged for the prompt plus the
delivered text when any text was delivered; an error or hang-up before any text is recorded and not
charged; never error text, never zero for delivered text.

"Delivered" is what the server sent. When the upstream cuts, the client saw all of it, so the billed
completion is exactly the client's text. When the client hangs up, a delta or two may already be on
the wire: the websocket keeps the server's text on the reply (billed exactly), and /v1 is checked
against what the client read, give or take the deltas in flight (`IN_FLIGHT`).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from decimal import Decimal

import openai
import pytest
import websockets

from agents.llm import tokens
from conversations import locks
from conversations.models import Message
from devtools.fake_openai import Knobs, prompt_tokens, reply_tokens, token_pieces
from tests.factories import make_agent, make_fake_model
from tests.fixtures_openai import make_account
from usage.models import CreditAccount, LedgerEntry, Reservation, UsageRecord

pytestmark = [pytest.mark.pg, pytest.mark.django_db(transaction=True), pytest.mark.timeout(60)]

MODEL = "cut-gpt"
INPUT_PRICE, OUTPUT_PRICE = Decimal("2"), Decimal("8")  # per million tokens
CREDIT = Decimal("100")
REPLY_TOKENS = 200  # far more than the largest cut: a cut stream never looks complete
PROMPT = "Tell me a long story"
CHUNKS = (0, 1, 5, 50)
# Client-side cuts on /v1: deltas the server may have sent after the client's last read, before it saw the close.
IN_FLIGHT = 3
CLIENT_CHUNK_DELAY = 0.02  # upstream pace when the client cuts: the server stays close behind the client


@pytest.fixture(scope="module")
def web_server_env() -> dict[str, str]:
    return {"LLM_RETRY_BASE_DELAY": "0.01"}  # an upstream dying before the first delta is retried: quickly


@pytest.fixture
def account(web_server, fake_upstream):
    model = make_fake_model(fake_upstream, MODEL, input_price=str(INPUT_PRICE), output_price=str(OUTPUT_PRICE))
    make_agent("cutter", model=model, system_prompt="You help {user}.")
    return make_account(credit=str(CREDIT))


@dataclass
class Seen:
    """What the client got: the joined delta text, how many deltas, and the error it was told (if any)."""

    text: str = ""
    deltas: int = 0
    error: str = ""


async def _until_upstream_called(fake_upstream) -> None:
    async with asyncio.timeout(10):
        while not fake_upstream.requests_for(MODEL):
            await asyncio.sleep(0.01)


async def via_openai(base_url: str, key: str, fake_upstream, *, close_after: int | None) -> Seen:
    """/v1/chat/completions, stream=true, with the async openai SDK; `close_after` = hang up after N deltas."""
    seen = Seen()
    async with openai.AsyncOpenAI(base_url=base_url + "/v1", api_key=key, max_retries=0, timeout=30) as client:
        create = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPT}],
                                                stream=True, stream_options={"include_usage": True})
        if close_after == 0:
            # No delta comes before the response starts: give up while the upstream is still thinking.
            task = asyncio.ensure_future(create)
            await _until_upstream_called(fake_upstream)
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return seen
        try:
            stream = await create
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    seen.text += chunk.choices[0].delta.content
                    seen.deltas += 1
                    if seen.deltas == close_after:
                        break
            await stream.close()
        except openai.APIError as exc:
            seen.error = exc.message
    return seen


async def via_websocket(base_url: str, key: str, fake_upstream, *, close_after: int | None) -> Seen:
    """/ws/chat/ with a `websockets` client; `close_after` = Stop (a `cancel` frame) after N delta frames.

    A socket that merely goes away does not stop its reply (docs/chat.md: a reload keeps it generating), so the
    client's way to cut a websocket stream is Stop; the frames after it (its final `cancelled` frame) are drained.
    """
    seen = Seen()
    headers = {"Origin": base_url, "Authorization": f"Bearer {key}"}
    url = base_url.replace("http://", "ws://", 1) + "/ws/chat/"
    async with websockets.connect(url, additional_headers=headers, open_timeout=5) as socket:
        await socket.send(json.dumps({"type": "message", "conversation": None, "agent": "cutter",
                                      "content": PROMPT, "client_id": "cut-1"}))
        conversation = None

        async def stop() -> Seen:
            await socket.send(json.dumps({"type": "cancel", "conversation": conversation}))
            while json.loads(await socket.recv())["type"] not in ("done", "error"):
                pass
            return seen

        async with asyncio.timeout(20):
            while True:
                frame = json.loads(await socket.recv())
                if frame["type"] == "status":
                    conversation = frame["conversation"]
                    if close_after == 0:
                        await _until_upstream_called(fake_upstream)
                        return await stop()
                elif frame["type"] == "delta":
                    seen.text += frame["content"]
                    seen.deltas += 1
                    if seen.deltas == close_after:
                        return await stop()
                elif frame["type"] == "error":
                    seen.error = frame["message_text"]
                    return seen
                elif frame["type"] == "done":
                    return seen


DRIVERS = {"openai": via_openai, "ws": via_websocket}


def _upstream_text(fake_upstream, chunks: int) -> str:
    """The text of the first `chunks` content chunks of the reply the fake upstream streamed."""
    body = fake_upstream.requests_for(MODEL)[-1]["body"]
    ids, _ = reply_tokens(Knobs(tokens=REPLY_TOKENS), body["messages"], body.get("max_tokens"))
    return "".join(token_pieces(ids)[:chunks])


@pytest.mark.parametrize("chunks", CHUNKS)
@pytest.mark.parametrize("side", ["upstream", "client"])
@pytest.mark.parametrize("entry_point", ["openai", "ws"])
def test_a_cut_stream_is_recorded_once_and_billed_for_what_was_delivered(
        entry_point, side, chunks, account, web_server, fake_upstream, assert_settled):
    if side == "upstream":
        fake_upstream.configure(MODEL, tokens=REPLY_TOKENS, cut_after=chunks, chunk_delay=0.002)
    elif chunks == 0:
        fake_upstream.configure(MODEL, tokens=REPLY_TOKENS, hang=True)
    else:
        fake_upstream.configure(MODEL, tokens=REPLY_TOKENS, chunk_delay=CLIENT_CHUNK_DELAY)

    seen = asyncio.run(DRIVERS[entry_point](web_server, account.raw, fake_upstream,
                                            close_after=chunks if side == "client" else None))

    # Whatever the cut, the server leaves nothing behind: no hold, no reply processing, no lock.
    assert_settled(wait=15)
    records = list(UsageRecord.objects.filter(user=account.user))
    assert len(records) == 1, [(r.status, r.token_source, r.completion_tokens) for r in records]
    record = records[0]
    assert record.entry_point == entry_point
    upstream_messages = fake_upstream.requests_for(MODEL)[-1]["body"]["messages"]

    if side == "upstream":
        assert seen.error  # the client was told the stream failed
        assert seen.text == _upstream_text(fake_upstream, chunks)
        if entry_point == "openai":
            assert seen.deltas == chunks
        assert record.status == "error"
    else:
        assert not seen.error and seen.deltas == chunks
        assert (record.status, record.error_code) == ("cancelled", "client_closed")

    delivered = seen.text
    if chunks == 0:
        # Nothing delivered: recorded, not charged, the hold released.
        assert delivered == ""
        assert record.token_source in ("estimated", "measured")
        assert (record.completion_tokens, record.charged, record.cost) == (0, False, 0)
        assert not LedgerEntry.objects.filter(kind="charge").exists()
        assert Reservation.objects.get(usage_record=record).status == "released"
    else:
        # Delivered text: partial, billed for the prompt plus that text, never zero, never the error text.
        assert delivered and record.token_source == "partial" and record.charged
        assert record.prompt_tokens == prompt_tokens(upstream_messages)
        if side == "upstream" or entry_point == "ws":
            billed_text = delivered if side == "upstream" else _reply(record).content
            assert billed_text.startswith(delivered)
            assert record.completion_tokens == tokens.count_text(billed_text) > 0
        else:
            floor = tokens.count_text(delivered)
            assert floor <= record.completion_tokens <= floor + IN_FLIGHT, (floor, record.completion_tokens)
        assert record.completion_tokens < REPLY_TOKENS
        assert record.cost == (record.prompt_tokens * INPUT_PRICE + record.completion_tokens * OUTPUT_PRICE) / 10**6
        assert record.cost > 0
        charge = LedgerEntry.objects.get(kind="charge")
        assert charge.usage_record_id == record.pk and charge.amount == -record.cost
        assert Reservation.objects.get(usage_record=record).status == "settled"
    account_row = CreditAccount.objects.get(user=account.user)
    assert account_row.balance == CREDIT - (record.cost if record.charged else 0) and account_row.reserved == 0

    if entry_point == "ws":
        reply = _reply(record)
        # A final status, keeping the text that arrived (and no error text), with the billed token count.
        assert reply.status == ("llm_error" if side == "upstream" else "error")
        assert reply.content.startswith(delivered) and reply.error_message
        assert reply.error_message not in reply.content
        if side == "upstream":
            assert reply.content == delivered
        assert reply.completion_tokens == record.completion_tokens
        assert reply.cost == (record.cost if record.charged else 0)  # what the reply says it cost is what was charged
        assert reply.reply_to.status == reply.status
        assert not locks.is_locked(reply.conversation_id, account.user.pk)


def _reply(record: UsageRecord) -> Message:
    assert record.message_id is not None
    reply = Message.objects.select_related("reply_to").get(pk=record.message_id)
    assert reply.role == "assistant"
    return reply
