"""The one table of what each LLMError code means to a client, per entry point (data only).

Every entry point reads it: the writer and staff runs (our REST shape), chat (REST and websocket frames)
and /v1 (OpenAI's shape). The codes and statuses are public contracts; tests/test_llm_error_table.py
pins them. A code missing here is answered as "llm_error".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

# OpenAI's error types, as the openai SDK's users expect them on /v1.
INVALID_REQUEST: Final = "invalid_request_error"
RATE_LIMIT: Final = "rate_limit_exceeded"
UPSTREAM: Final = "upstream_error"
SERVER: Final = "server_error"


@dataclass(frozen=True)
class ErrorSpec:
    http_status: int  # REST (writer) and /v1
    retryable: bool  # every entry point: `retryable` in our shape and websocket frames; x-should-retry on /v1
    openai_type: str  # /v1's error.type
    # Chat (a conversation's reply, REST and the replay of a failed one): the upstream refusing our request
    # (a 4xx) is not the chatting user's mistake, so 502 where the writer and /v1 say 400 or 404.
    chat_status: int


_UPSTREAM_FAILED = ErrorSpec(502, True, UPSTREAM, 502)
_UPSTREAM_REFUSED = ErrorSpec(502, False, UPSTREAM, 502)  # our key or upstream model is wrong: waiting won't fix

LLM_ERRORS: Final[Mapping[str, ErrorSpec]] = MappingProxyType({
    "llm_error": _UPSTREAM_FAILED,
    "upstream_error": _UPSTREAM_FAILED,  # the upstream's 5xx or 408
    "upstream_unavailable": _UPSTREAM_FAILED,  # connection failed
    "upstream_bad_response": _UPSTREAM_FAILED,  # malformed SSE or JSON
    "no_result": _UPSTREAM_FAILED,  # a stream that ended without its result
    "upstream_auth": _UPSTREAM_REFUSED,
    "upstream_model_not_found": _UPSTREAM_REFUSED,
    "upstream_timeout": ErrorSpec(504, True, UPSTREAM, 504),
    "rate_limited": ErrorSpec(429, True, RATE_LIMIT, 429),
    "bad_request": ErrorSpec(400, False, INVALID_REQUEST, 502),  # the upstream refused the request itself
    "model_not_found": ErrorSpec(404, False, INVALID_REQUEST, 502),
    # A request field the provider cannot serve (the demo provider and `tools`): the caller's to change.
    "unsupported_parameter": ErrorSpec(400, False, INVALID_REQUEST, 502),
    "no_healthy_deployment": ErrorSpec(503, True, SERVER, 503),
})

DEFAULT_CODE: Final = "llm_error"


def spec(code: str) -> ErrorSpec:
    return LLM_ERRORS.get(code) or LLM_ERRORS[DEFAULT_CODE]
