"""Errors in OpenAI's shape, {"error": {"message", "type", "code", "param"}}, with OpenAI's status codes.

The status code decides which exception the openai SDK raises (400 BadRequestError, 401
AuthenticationError, 404 NotFoundError, 429 RateLimitError, 5xx InternalServerError, anything else
APIStatusError). `x-should-retry: false` tells the SDK not to retry an error that waiting won't fix
(an exhausted quota or budget) or that must not be repeated (a 500 from a bug, after which the call may
already be billed), while rate limits carry `retry-after` so its retries wait just long enough.
"""

from __future__ import annotations

import json
import math
from typing import Any

from django.http import JsonResponse

from agents.llm import errors as llm_errors
from agents.llm.types import LLMError
from aiwriter.errors import ApiError

INVALID_REQUEST = "invalid_request_error"


class OpenAIError(Exception):
    """Raised anywhere on the /v1 path; the view renders it."""

    def __init__(self, message: str, *, status: int = 400, type: str = INVALID_REQUEST, code: str | None = None,
                 param: str | None = None, retry_after: float | None = None, should_retry: bool | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.code = code
        self.param = param
        self.retry_after = retry_after
        self.should_retry = should_retry

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}

    def headers(self) -> dict[str, str]:
        headers = {}
        if self.retry_after is not None:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
        if self.should_retry is not None:
            headers["x-should-retry"] = "true" if self.should_retry else "false"
        return headers

    def response(self) -> JsonResponse:
        return JsonResponse(self.body(), status=self.status, headers=self.headers())

    def sse_event(self) -> bytes:
        """An error after the stream started: the SDK raises APIError when it reads this event."""
        return f"data: {json.dumps(self.body())}\n\n".encode()


def invalid_api_key() -> OpenAIError:
    return OpenAIError("Incorrect API key provided, or the key is revoked or expired.", status=401,
                       code="invalid_api_key")


def internal_error() -> OpenAIError:
    # A bug on our side, maybe after the upstream answered and the call was billed: the SDK must not repeat it.
    return OpenAIError("The server had an error while processing your request.", status=500, type="server_error",
                       code="internal_error", should_retry=False)


def model_not_found(name: str) -> OpenAIError:
    # Same answer for "no such model" and "this key may not use it": a key can't probe for names.
    return OpenAIError(f"The model `{name}` does not exist or you do not have access to it.", status=404,
                       code="model_not_found", param="model")


# Our ApiError codes (usage.errors and friends) → the OpenAI error type the SDK user would expect.
_API_ERROR_TYPES = {
    "insufficient_balance": "insufficient_quota",
    "quota_exceeded": "insufficient_quota",
    "key_budget_exceeded": "insufficient_quota",
}


def from_api_error(exc: ApiError) -> OpenAIError:
    status = exc.status_code
    code = exc.code
    if exc.code == "rate_limited":
        error_type = exc.extra.get("limit", "requests")  # OpenAI says which limit: "requests" or "tokens"
        code = "rate_limit_exceeded"  # OpenAI's code for a key's own limits
    else:
        error_type = _API_ERROR_TYPES.get(exc.code) or (INVALID_REQUEST if status < 500 else "server_error")
    retry_after = None
    raw_retry_after = (exc.headers or {}).get("Retry-After")
    if raw_retry_after:
        try:
            retry_after = float(raw_retry_after)
        except ValueError:
            retry_after = None
    # Balance, quota and budget don't come back by retrying within seconds, nor does an oversized prompt.
    should_retry = False if error_type == "insufficient_quota" or (status == 429 and not exc.retryable) else None
    return OpenAIError(exc.message, status=status, type=error_type, code=code, retry_after=retry_after,
                       should_retry=should_retry)


def from_llm_error(exc: LLMError) -> OpenAIError:
    spec = llm_errors.spec(exc.code)  # the one table: agents/llm/errors.py
    should_retry = None if spec.retryable else False
    return OpenAIError(exc.message, status=spec.http_status, type=spec.openai_type, code=exc.code,
                       retry_after=exc.retry_after, should_retry=should_retry)


def to_openai_error(exc: Exception) -> OpenAIError | None:
    """The OpenAI-shaped form of any error raised on the /v1 path; None for a bug (let it be a 500)."""
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, ApiError):
        return from_api_error(exc)
    if isinstance(exc, LLMError):
        return from_llm_error(exc)
    return None
