"""Server-sent events from an upstream's byte stream, as the JSON of each `data:` event.

The openai SDK's own stream decodes every event into a ChatCompletionChunk (pydantic models per chunk); this reads
the same bytes as plain dicts, one `json.loads` per event, with the SDK's rules: an event ends at a blank line,
several `data:` lines join with a newline, comments and other fields are skipped, an event left unterminated at
the end of the body is dropped. Lines end with LF or CRLF (what OpenAI-compatible servers send).
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

DONE = b"[DONE]"


async def events(chunks: AsyncIterator[bytes]) -> AsyncGenerator[bytes, None]:
    """The data of each event, as bytes (`[DONE]` included: the caller decides when to stop)."""
    pending = b""
    data: list[bytes] = []
    async for chunk in chunks:
        if pending:
            chunk = pending + chunk
        lines = chunk.split(b"\n")
        pending = lines.pop()
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if data:
                    yield data[0] if len(data) == 1 else b"\n".join(data)
                    data = []
            elif line.startswith(b"data:"):
                value = line[5:]
                data.append(value[1:] if value.startswith(b" ") else value)


def decode(data: bytes) -> dict[str, Any]:
    """One event's JSON object. ValueError when it is not one (a malformed stream)."""
    value = json.loads(data)
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object in the stream, got {type(value).__name__}")
    return value
