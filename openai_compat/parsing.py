"""Parse an OpenAI chat-completions request body into plain data (no database access here).

Unknown fields are ignored, as OpenAI's own clients send fields we have no use for. Content in the
list-of-parts form is joined to one string: the service layer speaks text only. Function calling (`tools`,
`tool_choice`, `parallel_tool_calls`, assistant `tool_calls` and `tool` messages) is checked for shape and passed
through to the upstream.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from django.conf import settings

from aiwriter import parsers as json_body
from openai_compat.errors import OpenAIError

ROLES = {"system", "developer", "user", "assistant", "tool"}
MAX_STOP_SEQUENCES = 4
MAX_TOOLS = 128  # OpenAI's own limit
TOOL_CHOICES = ("none", "auto", "required")


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
            raise _bad(f"Unsupported role {role!r}; expected one of system, developer, user, assistant, tool.",
                       f"{param}.role", "invalid_value")
        text = _content_text(message.get("content"), f"{param}.content")
        if len(text) > settings.OPENAI_MAX_MESSAGE_CHARS:
            raise _bad(f"A message may hold at most {settings.OPENAI_MAX_MESSAGE_CHARS} characters.",
                       f"{param}.content", "string_above_max_length")
        # "developer" is the newer name for "system"; upstreams that predate it only know "system".
        normalized: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": text}
        if isinstance(message.get("name"), str) and message["name"]:
            normalized["name"] = message["name"]
        if role == "assistant" and message.get("tool_calls") is not None:
            normalized["tool_calls"] = _tool_calls(message["tool_calls"], f"{param}.tool_calls")
            if message.get("content") is None:
                normalized["content"] = None  # as the client sent it: some upstreams refuse "" beside tool_calls
        if role == "tool":
            if not isinstance(message.get("tool_call_id"), str) or not message["tool_call_id"]:
                raise _bad("A 'tool' message needs the 'tool_call_id' it answers.", f"{param}.tool_call_id",
                           "missing_required_parameter")
            normalized["tool_call_id"] = message["tool_call_id"]
        messages.append(normalized)
    return messages


def _tool_calls(value: Any, param: str) -> list[dict[str, Any]]:
    """An assistant turn's earlier function calls, sent back with the tool results: kept as given, checked."""
    if not isinstance(value, list):
        raise _bad("'tool_calls' must be an array.", param, "invalid_type")
    for n, call in enumerate(value):
        function = call.get("function") if isinstance(call, dict) else None
        if (not isinstance(call.get("id") if isinstance(call, dict) else None, str) or not isinstance(function, dict)
                or not isinstance(function.get("name"), str) or not isinstance(function.get("arguments"), str)):
            raise _bad("Each tool call needs an 'id' and a 'function' with 'name' and 'arguments' strings.",
                       f"{param}[{n}]", "invalid_value")
    return value


def _tools(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    tools = body.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise _bad(f"'tools' must be an array of at most {MAX_TOOLS} tools.", "tools", "invalid_type")
    for n, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if (not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict)
                or not isinstance(function.get("name"), str) or not function["name"]):
            raise _bad("Each tool must be {\"type\": \"function\", \"function\": {\"name\": ..., ...}}.",
                       f"tools[{n}]", "invalid_value")
        if function.get("parameters") is not None and not isinstance(function["parameters"], dict):
            raise _bad("A function's 'parameters' must be a JSON Schema object.", f"tools[{n}].function.parameters",
                       "invalid_type")
    return tools or None


def _tool_choice(value: Any) -> str | dict[str, Any] | None:
    if value is None or value in TOOL_CHOICES:
        return value
    function = value.get("function") if isinstance(value, dict) else None
    if isinstance(function, dict) and value.get("type") == "function" and isinstance(function.get("name"), str):
        return value
    raise _bad("'tool_choice' must be none, auto, required or {\"type\": \"function\", \"function\": "
               "{\"name\": ...}}.", "tool_choice", "invalid_value")


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
    parallel_tool_calls = body.get("parallel_tool_calls")
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise _bad("'parallel_tool_calls' must be a boolean.", "parallel_tool_calls", "invalid_type")
    tools = _tools(body)
    tool_choice = _tool_choice(body.get("tool_choice"))
    if tool_choice not in (None, "none") and not tools:
        raise _bad("'tool_choice' needs 'tools'.", "tool_choice", "invalid_value")

    options = {
        "temperature": _number(body, "temperature", 0, 2),
        "top_p": _number(body, "top_p", 0, 1),
        "stop": _stop(body.get("stop")),
        "response_format": response_format,
        "user": user,
        "tools": tools,
        "tool_choice": tool_choice if tools else None,
        "parallel_tool_calls": parallel_tool_calls if tools else None,
    }
    return CompletionParams(
        model=model,
        messages=parse_messages(body.get("messages")),
        stream=bool(stream),
        include_usage=bool(stream and (stream_options or {}).get("include_usage")),
        options={k: v for k, v in options.items() if v is not None},
        max_tokens=_max_tokens(body),
    )
