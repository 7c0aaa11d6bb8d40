"""Parse an OpenAI chat-completions request body into plain data (no database access here).

Unknown fields are ignored, as OpenAI's own clients send fields we have no use for. Content in the
list-of-parts form is joined to one string: the service layer speaks text only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from django.conf import settings

from agents.openai_compat.errors import OpenAIError
from aiwriter import parsers as json_body

ROLES = {"system", "developer", "user", "assistant"}
MAX_STOP_SEQUENCES = 4


@dataclass
class CompletionParams:
    model: str
    messages: list[dict[str, Any]]
    stream: bool = False
    include_usage: bool = False
    # Sampling options forwarded to the upstream; only those the client set.
    options: dict[str, Any] = field(default_factory=dict)
    max_tokens: int | None = None


def _bad(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(message, status=400, param=param, code=code)


def _number(body: dict[str, Any], name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise _bad(f"'{name}' must be a number between {low:g} and {high:g}.", name, "invalid_value")
    return float(value)


def _content_text(content: Any, param: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for n, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad("Only text content parts ({\"type\": \"text\", \"text\": ...}) are supported.",
                           f"{param}[{n}]", "invalid_value")
            parts.append(part["text"])
        return "".join(parts)
    raise _bad("Message content must be a string or a list of text parts.", param, "invalid_type")


def parse_messages(raw: Any) -> list[dict[str, Any]]:
    if not isinstance(raw, list) or not raw:
        raise _bad("'messages' must be a non-empty array.", "messages", "invalid_type")
    if len(raw) > settings.OPENAI_MAX_MESSAGES:
        raise _bad(f"At most {settings.OPENAI_MAX_MESSAGES} messages are accepted.", "messages", "too_many_messages")
    messages = []
    for n, message in enumerate(raw):
        param = f"messages[{n}]"
        if not isinstance(message, dict):
            raise _bad("Each message must be an object.", param, "invalid_type")
        role = message.get("role")
        if role not in ROLES:
            raise _bad(f"Unsupported role {role!r}; expected one of system, developer, user, assistant.",
                       f"{param}.role", "invalid_value")
        text = _content_text(message.get("content"), f"{param}.content")
        if len(text) > settings.OPENAI_MAX_MESSAGE_CHARS:
            raise _bad(f"A message may hold at most {settings.OPENAI_MAX_MESSAGE_CHARS} characters.",
                       f"{param}.content", "string_above_max_length")
        # "developer" is the newer name for "system"; upstreams that predate it only know "system".
        normalized: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": text}
        if isinstance(message.get("name"), str) and message["name"]:
            normalized["name"] = message["name"]
        messages.append(normalized)
    return messages


def _max_tokens(body: dict[str, Any]) -> int | None:
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _bad(f"'{name}' must be a positive integer.", name, "invalid_value")
        return value
    return None


def _stop(value: Any) -> str | list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if (isinstance(value, list) and len(value) <= MAX_STOP_SEQUENCES
            and all(isinstance(s, str) for s in value)):
        return value or None
    raise _bad(f"'stop' must be a string or an array of at most {MAX_STOP_SEQUENCES} strings.", "stop",
               "invalid_value")


def parse_body(raw: bytes) -> CompletionParams:
    try:
        body = json_body.loads(raw)  # nesting bounded: no RecursionError (500) on a deep document
    except json_body.BadJSON as exc:
        raise _bad(f"The request body is refused: {exc}", code="invalid_json") from None
    except (ValueError, UnicodeDecodeError):
        raise _bad("The request body is not valid JSON.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise _bad("The request body must be a JSON object.", code="invalid_json")

    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("'model' is required.", "model", "missing_required_parameter")
    if "\x00" in model:  # PostgreSQL cannot compare text with NUL: bad input, not a 500
        raise _bad("'model' may not contain NUL characters.", "model", "invalid_value")
    n = body.get("n")
    if n is not None and n != 1:
        raise _bad("Only n=1 is supported.", "n", "invalid_value")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _bad("'stream' must be a boolean.", "stream", "invalid_type")
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise _bad("'stream_options' must be an object.", "stream_options", "invalid_type")
    response_format = body.get("response_format")
    if response_format is not None and not isinstance(response_format, dict):
        raise _bad("'response_format' must be an object.", "response_format", "invalid_type")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise _bad("'user' must be a string.", "user", "invalid_type")

    options = {
        "temperature": _number(body, "temperature", 0, 2),
        "top_p": _number(body, "top_p", 0, 1),
        "stop": _stop(body.get("stop")),
        "response_format": response_format,
        "user": user,
    }
    return CompletionParams(
        model=model,
        messages=parse_messages(body.get("messages")),
        stream=bool(stream),
        include_usage=bool(stream and (stream_options or {}).get("include_usage")),
        options={k: v for k, v in options.items() if v is not None},
        max_tokens=_max_tokens(body),
    )
