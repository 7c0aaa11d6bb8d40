"""One table maps every LLMError to what each entry point answers (agents/llm/errors.py); these are public.

Pinned per error: the writer's REST status/code/retryable, chat's REST status (live and when a failed
reply is told again) and websocket frame (code, retryable), and /v1's status, type, code and x-should-retry.
"""

import pytest

from agents.llm import errors
from agents.llm.types import (
    BadUpstreamRequest,
    LLMError,
    ModelNotFound,
    NoHealthyDeployment,
    RateLimited,
    UpstreamTimeout,
)
from conversations.generation import error_frame, llm_outcome, outcome_error, outcome_frame
from conversations.models import Message
from openai_compat.errors import from_llm_error
from writer.services import api_error

# error → (writer REST status, chat REST status, retryable, /v1 type, /v1 x-should-retry)
TABLE = [
    (LLMError("x"), 502, 502, True, "upstream_error", None),
    (LLMError("x", code="upstream_error"), 502, 502, True, "upstream_error", None),
    (LLMError("x", code="upstream_unavailable"), 502, 502, True, "upstream_error", None),
    (LLMError("x", code="upstream_bad_response"), 502, 502, True, "upstream_error", None),
    (LLMError("x", code="no_result"), 502, 502, True, "upstream_error", None),
    (LLMError("x", code="upstream_auth", failover=True), 502, 502, False, "upstream_error", "false"),
    (LLMError("x", code="upstream_model_not_found", failover=True), 502, 502, False, "upstream_error", "false"),
    (UpstreamTimeout("x"), 504, 504, True, "upstream_error", None),
    (RateLimited("x"), 429, 429, True, "rate_limit_exceeded", None),
    (BadUpstreamRequest("x"), 400, 502, False, "invalid_request_error", "false"),
    (ModelNotFound("x"), 404, 502, False, "invalid_request_error", "false"),
    (BadUpstreamRequest("x", code="unsupported_parameter"), 400, 502, False, "invalid_request_error", "false"),
    (NoHealthyDeployment("x"), 503, 503, True, "server_error", None),
]


@pytest.mark.parametrize(("exc", "rest_status", "chat_status", "retryable", "v1_type", "should_retry"), TABLE,
                         ids=[row[0].code for row in TABLE])
def test_each_llm_error_answers_the_same_at_every_entry_point(exc, rest_status, chat_status, retryable, v1_type,
                                                             should_retry):
    assert (exc.http_status, exc.retryable) == (rest_status, retryable)

    writer = api_error(exc)  # the writer (our REST shape)
    assert (writer.status_code, writer.code, writer.retryable) == (rest_status, exc.code, retryable)

    assert llm_outcome(exc.code) == (chat_status, retryable)  # chat REST and its websocket frame
    frame = error_frame(exc.code, exc.message, llm_outcome(exc.code)[1], 7)
    assert (frame["code"], frame["retryable"]) == (exc.code, retryable)

    # A failed reply told again (a replayed client_id) answers as the first time.
    reply = Message(pk=7, status=Message.Status.LLM_ERROR, error_code=exc.code, error_message="x")
    replayed = outcome_error(reply)
    assert (replayed.status_code, replayed.code, replayed.retryable) == (chat_status, exc.code, retryable)
    assert (outcome_frame(reply)["code"], outcome_frame(reply)["retryable"]) == (exc.code, retryable)

    v1 = from_llm_error(exc)  # /v1 (OpenAI's shape)
    assert (v1.status, v1.type, v1.code) == (rest_status, v1_type, exc.code)
    assert v1.headers().get("x-should-retry") == should_retry


def test_every_code_in_the_table_is_pinned():
    assert set(errors.LLM_ERRORS) == {row[0].code for row in TABLE}


def test_an_unknown_code_answers_as_llm_error():
    exc = LLMError("x", code="something_new")
    assert (exc.http_status, exc.retryable) == (502, True)
    assert llm_outcome(exc.code) == (502, True)
    assert (from_llm_error(exc).status, from_llm_error(exc).type) == (502, "upstream_error")


def test_refusals_before_the_model_keep_their_own_replay_statuses():
    for code, status in (("quota_exceeded", 429), ("key_budget_exceeded", 429), ("insufficient_balance", 402)):
        reply = Message(pk=7, status=Message.Status.INSUFFICIENT_BALANCE, error_code=code, error_message="x")
        replayed = outcome_error(reply)
        assert (replayed.status_code, replayed.code, replayed.retryable) == (status, code, False)


def test_retry_after_is_told_as_each_shape_tells_it():
    exc = RateLimited("x", retry_after=1.4)
    assert api_error(exc).headers["Retry-After"] == "1"  # the writer rounds
    assert from_llm_error(exc).headers()["Retry-After"] == "2"  # /v1 rounds up
    assert "Retry-After" not in api_error(RateLimited("x")).headers


def test_llm_error_fields_are_declared_with_defaults():
    exc = UpstreamTimeout("slow")
    assert (exc.message, exc.code, exc.partial, exc.retry_after) == ("slow", "upstream_timeout", None, None)
    assert (exc.failover, exc.deadline, exc.usage_record) == (False, False, None)
    assert UpstreamTimeout("slow", deadline=True).deadline
    assert LLMError("refused", code="upstream_auth", failover=True).failover
