"""Offline token counting with a real BPE vocabulary shipped inside bpe-openai."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import bpe_openai

# OpenAI's chat format: every message costs 3 tokens of framing, every reply is primed with 3.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING_TOKENS = 3


@lru_cache(maxsize=8)
def _encoding(name: str):
    return bpe_openai.get_encoding(name)


def encoding_for(model: str) -> Any:
    try:
        return bpe_openai.encoding_for_model(model)
    except Exception:  # noqa: BLE001 - unknown names use the current default vocabulary
        return _encoding("o200k_base")


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
        if message.get("name"):
            total += TOKENS_PER_NAME + len(encoding.encode_ordinary(message["name"]))
    return total
