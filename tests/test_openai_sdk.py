"""/v1 driven by the real openai SDK against a live daphne and the fake upstream.

Every case runs with both clients, `openai.OpenAI` and `openai.AsyncOpenAI` (`Sdk` below gives them one
interface; the async one runs on a fresh event loop per call). One daphne per test, so each test covers
both clients rather than being parametrized over them: starting daphne is the slow part.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import openai
import pytest

from aiwriter.money import money_str
from devtools.fake_openai import Knobs, echo_text, prompt_tokens, reply_tokens, token_pieces
from tests.factories import make_agent
from tests.fixtures_openai import FAKE_GPT_INPUT_PRICE, FAKE_GPT_OUTPUT_PRICE, Account, make_account
from usage.models import CreditAccount, LedgerEntry, UsageRecord

pytestmark = [pytest.mark.pg, pytest.mark.django_db(transaction=True)]

KINDS = ("sync", "async")
MESSAGES = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hello there"}]
CREDIT = Decimal("100")


@dataclass
class Sdk:
    """One call at a time through the sync or the async openai client; answers (parsed, headers)."""

    kind: str
    base: str
    key: str
    arrivals: list[float] = field(default_factory=list)  # time.monotonic() of each chunk of the last stream

    def _options(self) -> dict[str, Any]:
        return {"base_url": self.base + "/v1", "api_key": self.key, "max_retries": 0, "timeout": 30}

    def create(self, **kwargs: Any) -> tuple[Any, Any]:
        if self.kind == "sync":
            with openai.OpenAI(**self._options()) as client:
                raw = client.chat.completions.with_raw_response.create(**kwargs)
                return raw.parse(), raw.headers

        async def go() -> tuple[Any, Any]:
            async with openai.AsyncOpenAI(**self._options()) as client:
                raw = await client.chat.completions.with_raw_response.create(**kwargs)
                return raw.parse(), raw.headers

        return asyncio.run(go())

    def stream(self, *, close_after: int | None = None, **kwargs: Any) -> tuple[list[Any], Any]:
        """The chunks of a streamed completion and the response headers; with `close_after`, hangs up
        after that many content chunks."""
        kwargs["stream"] = True
        self.arrivals = []

        def wanted(chunks: list[Any]) -> bool:
            content = sum(bool(c.choices and c.choices[0].delta.content) for c in chunks)
            return close_after is None or content < close_after

        if self.kind == "sync":
            with openai.OpenAI(**self._options()) as client:
                raw = client.chat.completions.with_raw_response.create(**kwargs)
                stream, chunks = raw.parse(), []
                for chunk in stream:
                    self.arrivals.append(time.monotonic())
                    chunks.append(chunk)
                    if not wanted(chunks):
                        break
                stream.close()
                return chunks, raw.headers

        async def go() -> tuple[list[Any], Any]:
            async with openai.AsyncOpenAI(**self._options()) as client:
                raw = await client.chat.completions.with_raw_response.create(**kwargs)
                stream, chunks = raw.parse(), []
                async for chunk in stream:
                    self.arrivals.append(time.monotonic())
                    chunks.append(chunk)
                    if not wanted(chunks):
                        break
                await stream.close()
                return chunks, raw.headers

        return asyncio.run(go())


def clients(base: str, **account_fields: Any) -> list[tuple[Sdk, Account]]:
    """A fresh funded account per client kind, so each call's record, ledger and balance stand alone."""
    pairs = []
    for kind in KINDS:
        account = make_account(project=f"project-{kind}", **account_fields)
        pairs.append((Sdk(kind, base, account.raw), account))
    return pairs


def expected_cost(prompt: int, completion: int) -> Decimal:
    raw = prompt * Decimal(FAKE_GPT_INPUT_PRICE) + completion * Decimal(FAKE_GPT_OUTPUT_PRICE)
    return (raw / Decimal(1_000_000)).quantize(Decimal("1e-10"))


def upstream_text(messages: list[dict[str, Any]], **knobs: Any) -> str:
    """The exact text the fake upstream streams for these messages and knobs."""
    ids, _ = reply_tokens(Knobs(**knobs), messages, None)
    return "".join(token_pieces(ids))


def wait_for_record(api_key, timeout: float = 20.0) -> UsageRecord:
    """A hung-up stream is recorded when daphne notices the disconnect: shortly after the client left."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = UsageRecord.objects.filter(api_key=api_key).first()
        if record is not None:
            return record
        time.sleep(0.05)
    raise AssertionError("no usage record was written")


def assert_charged_exactly(account: Account, record: UsageRecord, *, prompt: int, completion: int,
                           status: str = "success", token_source: str = "measured") -> None:
    """The record is the key's user's and project's, priced exactly, with one matching ledger charge."""
    assert (record.user_id, record.api_key_id, record.project, record.entry_point) == (
        account.user.pk, account.key.pk, account.key.project, "openai")
    assert (record.model, record.status, record.token_source) == ("fake-gpt", status, token_source)
    assert (record.prompt_tokens, record.completion_tokens, record.total_tokens) == (
        prompt, completion, prompt + completion)
    assert record.cost == expected_cost(prompt, completion) > 0 and record.charged
    entry = LedgerEntry.objects.get(usage_record=record)
    assert entry.kind == LedgerEntry.Kind.CHARGE and entry.account.user_id == account.user.pk
    assert entry.amount == -record.cost and entry.balance_after == CREDIT - record.cost
    assert CreditAccount.objects.get(user=account.user).balance == CREDIT - record.cost


def test_plain_completion_is_answered_and_charged_exactly(live_server_daphne, fake_gpt, fake_upstream):
    for sdk, account in clients(live_server_daphne):
        reply, headers = sdk.create(model="fake-gpt", messages=MESSAGES)
        assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-"), sdk.kind
        assert reply.choices[0].message.content == echo_text(MESSAGES)
        assert reply.choices[0].finish_reason == "stop" and reply.model == "fake-gpt"
        assert reply.usage.prompt_tokens == prompt_tokens(MESSAGES)
        assert not reply.model_extra  # our extras are headers, never body fields
        record = UsageRecord.objects.get(api_key=account.key)
        assert_charged_exactly(account, record, prompt=reply.usage.prompt_tokens,
                               completion=reply.usage.completion_tokens)
        assert headers["x-aiwriter-cost"] == money_str(record.cost)
        assert headers["x-aiwriter-provider"] == record.provider != ""
        assert (headers["x-aiwriter-fallback"], headers["x-aiwriter-cache"]) == ("false", "miss")
    assert fake_upstream.served["fake-gpt"] == 2


def test_stream_deltas_join_to_the_upstream_text_and_end_with_usage(live_server_daphne, fake_gpt, fake_upstream):
    fake_upstream.configure("fake-gpt", tokens=40)
    expected = upstream_text(MESSAGES, tokens=40)
    for sdk, account in clients(live_server_daphne):
        chunks, headers = sdk.stream(model="fake-gpt", messages=MESSAGES, stream_options={"include_usage": True})
        assert headers["content-type"].startswith("text/event-stream"), sdk.kind
        assert headers["x-aiwriter-cost"] == "pending"
        assert (headers["x-aiwriter-fallback"], headers["x-aiwriter-cache"]) == ("false", "miss")
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-2].choices[0].finish_reason == "stop"
        assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
        usage = chunks[-1].usage
        assert chunks[-1].choices == [] and all(c.usage is None for c in chunks[:-1])
        assert (usage.prompt_tokens, usage.completion_tokens) == (prompt_tokens(MESSAGES), 40)
        assert fake_upstream.requests[-1]["body"]["stream"] is True
        record = UsageRecord.objects.get(api_key=account.key)
        assert_charged_exactly(account, record, prompt=usage.prompt_tokens, completion=40)
        assert headers["x-aiwriter-provider"] == record.provider != ""  # known when the headers left


def test_stream_without_include_usage_ends_without_a_usage_chunk(live_server_daphne, fake_gpt, fake_upstream):
    for sdk, account in clients(live_server_daphne):
        chunks, _ = sdk.stream(model="fake-gpt", messages=MESSAGES)
        assert all(c.choices and c.usage is None for c in chunks), sdk.kind
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == echo_text(MESSAGES)
        record = UsageRecord.objects.get(api_key=account.key)  # still metered from the upstream's usage
        assert_charged_exactly(account, record, prompt=prompt_tokens(MESSAGES),
                               completion=len(reply_tokens(Knobs(), MESSAGES, None)[0]))


def test_stream_chunks_are_not_buffered(live_server_daphne, fake_gpt, fake_upstream):
    fake_upstream.configure("fake-gpt", tokens=6, chunk_delay=0.4)
    for sdk, _ in clients(live_server_daphne):
        chunks, _ = sdk.stream(model="fake-gpt", messages=MESSAGES)
        arrivals = [at for at, c in zip(sdk.arrivals, chunks, strict=True) if c.choices and c.choices[0].delta.content]
        # Six tokens 0.4 s apart upstream: the first must reach the client well before the last. A buffer
        # anywhere on the way (middleware, daphne) would hand them over together at the end.
        assert len(arrivals) == 6 and arrivals[-1] - arrivals[0] > 1.0, sdk.kind


def test_agent_applies_its_system_prompt(live_server_daphne, fake_gpt, fake_upstream):
    agent = make_agent("copy-editor", model=fake_gpt, system_prompt="You edit copy for project {project}.")
    for sdk, account in clients(live_server_daphne):
        reply, _ = sdk.create(model="agent:copy-editor", messages=MESSAGES)
        system = f"You edit copy for project {account.key.project}."
        assert fake_upstream.requests[-1]["body"]["messages"][0] == {"role": "system", "content": system}
        assert reply.choices[0].message.content == f"Echo. System: {system} | User: Hello there", sdk.kind
        assert reply.model == "agent:copy-editor"
        chunks, _ = sdk.stream(model="agent:copy-editor", messages=MESSAGES)
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == reply.choices[0].message.content
        assert [r.agent_id for r in UsageRecord.objects.filter(api_key=account.key)] == [agent.pk, agent.pk]


def test_bad_key_and_unknown_model_raise_the_sdks_classes(live_server_daphne, fake_gpt, fake_upstream):
    for sdk, _ in clients(live_server_daphne):
        bad = Sdk(sdk.kind, sdk.base, "aiw_wrong")
        for stream in (False, True):
            with pytest.raises(openai.AuthenticationError) as info:
                bad.stream(model="fake-gpt", messages=MESSAGES) if stream else bad.create(
                    model="fake-gpt", messages=MESSAGES)
            assert (info.value.status_code, info.value.code) == (401, "invalid_api_key"), sdk.kind
            with pytest.raises(openai.NotFoundError) as info:
                sdk.stream(model="gpt-nope", messages=MESSAGES) if stream else sdk.create(
                    model="gpt-nope", messages=MESSAGES)
            assert (info.value.code, info.value.param, info.value.type) == (
                "model_not_found", "model", "invalid_request_error")
    assert fake_upstream.requests == []


def test_exhausted_balance_is_402_before_any_upstream_call(live_server_daphne, fake_gpt, fake_upstream):
    (paying, _), _ = clients(live_server_daphne)
    paying.create(model="fake-gpt", messages=MESSAGES)
    upstream_calls = len(fake_upstream.requests)
    assert upstream_calls == 1
    for sdk, broke in clients(live_server_daphne, credit=None):
        for stream in (False, True):
            with pytest.raises(openai.APIStatusError) as info:
                sdk.stream(model="fake-gpt", messages=MESSAGES) if stream else sdk.create(
                    model="fake-gpt", messages=MESSAGES)
            # 402, documented in docs/openai-compat.md: only a top-up fixes it, so the SDK must not retry.
            assert info.value.status_code == 402, sdk.kind
            assert (info.value.code, info.value.type) == ("insufficient_balance", "insufficient_quota")
            assert info.value.response.headers["x-should-retry"] == "false"
            assert len(fake_upstream.requests) == upstream_calls
        assert not UsageRecord.objects.filter(api_key=broke.key).exists()
        assert not LedgerEntry.objects.filter(account__user=broke.user).exists()


def test_client_closing_a_stream_early_pays_only_for_what_was_generated(live_server_daphne, fake_gpt,
                                                                         fake_upstream):
    fake_upstream.configure("fake-gpt", tokens=400, chunk_delay=0.02)
    for sdk, account in clients(live_server_daphne):
        chunks, _ = sdk.stream(model="fake-gpt", messages=MESSAGES, stream_options={"include_usage": True},
                               close_after=5)
        assert chunks[-1].usage is None, sdk.kind  # hung up long before the end
        record = wait_for_record(account.key)
        # The record says the call was cut off and billed from the text generated until then.
        assert (record.status, record.token_source, record.error_code) == ("cancelled", "partial", "client_closed")
        assert 5 <= record.completion_tokens < 200
        assert_charged_exactly(account, record, prompt=prompt_tokens(MESSAGES), completion=record.completion_tokens,
                               status="cancelled", token_source="partial")
    assert fake_upstream.served["fake-gpt"] == 0  # each upstream stream was closed, not read to the end
