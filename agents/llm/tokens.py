"""Offline token counting with a real BPE vocabulary shipped inside bpe-openai."""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import bpe_openai

# OpenAI's chat format: every message costs 3 tokens of framing, every reply is primed with 3.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING_TOKENS = 3

DEFAULT_ENCODING = "o200k_base"
# Model-name prefixes as tiktoken maps them (bpe-openai only knows exact names, and its
# encoding_for_model() rejects even those); anything unknown (qwen, deepseek, ...) gets o200k_base.
_PREFIXES = (
    ("gpt-4o", "o200k_base"), ("chatgpt-4o", "o200k_base"), ("gpt-4.1", "o200k_base"), ("gpt-4.5", "o200k_base"),
    ("gpt-5", "o200k_base"), ("gpt-oss", "o200k_base"), ("o1", "o200k_base"), ("o3", "o200k_base"),
    ("o4", "o200k_base"), ("gpt-4", "cl100k_base"), ("gpt-3.5", "cl100k_base"), ("gpt-35", "cl100k_base"),
    ("text-embedding-3", "cl100k_base"), ("text-embedding-ada-002", "cl100k_base"),
)


@lru_cache(maxsize=8)
def _encoding(name: str) -> Any:  # bpe_openai has no type information
    return bpe_openai.get_encoding(name)


@lru_cache(maxsize=512)
def encoding_name_for(model: str) -> str:
    """The vocabulary a model name uses: exact names from bpe-openai, then tiktoken's prefixes."""
    name = model.rsplit("/", 1)[-1].lower().removeprefix("ft:")  # "openai/gpt-4o", "ft:gpt-4o-mini:org::id"
    try:
        found = bpe_openai.encoding_name_for_model(name)
    except Exception:  # noqa: BLE001 - not an exact name: try the prefixes
        found = next((enc for prefix, enc in _PREFIXES if name.startswith(prefix)), DEFAULT_ENCODING)
    # Chat models use one of these two; pre-chat vocabularies (p50k, gpt2) are not worth loading.
    return found if found in ("o200k_base", "cl100k_base") else DEFAULT_ENCODING


def encoding_for(model: str) -> Any:
    return _encoding(encoding_name_for(model or ""))


def count_text(text: str, model: str = "") -> int:
    if not text:
        return 0
    return len(encoding_for(model).encode_ordinary(text))


def message_text(content: Any) -> str:
    """Text of a message's content, in the string or list-of-parts form."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content)


def count_messages(messages: list[dict[str, Any]], model: str = "") -> int:
    encoding = encoding_for(model)
    total = REPLY_PRIMING_TOKENS
    for message in messages:
        total += TOKENS_PER_MESSAGE
        total += len(encoding.encode_ordinary(message.get("role", "")))
        total += len(encoding.encode_ordinary(message_text(message.get("content"))))
        if message.get("tool_calls"):  # an assistant turn that called functions: names and arguments
            total += len(encoding.encode_ordinary(json.dumps(message["tool_calls"], separators=(",", ":"))))
        if message.get("name"):
            total += TOKENS_PER_NAME + len(encoding.encode_ordinary(message["name"]))
    return total
