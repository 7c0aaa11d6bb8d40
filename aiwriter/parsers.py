"""Our one JSON reading of request bodies and websocket frames: bounded nesting, and no NUL characters.

`loads` is used by the API's DRF parser, /v1 (openai_compat/parsing.py) and the chat websocket.
A document nested deeper than MAX_JSON_DEPTH is refused (json would otherwise raise RecursionError, a
500, and code walking it later could too); the walk is iterative. NUL is refused where the strings are
stored or looked up (the API and the websocket; PostgreSQL text cannot hold it).
"""

from __future__ import annotations

import json
from typing import Any

from rest_framework import parsers
from rest_framework.exceptions import ParseError

NUL = "\x00"
MAX_JSON_DEPTH = 64  # far above any body of ours (a /v1 message's content parts are 4 deep)


class BadJSON(ValueError):
    """Valid-looking JSON we refuse: too deep, or NUL in a string when NUL is not allowed."""


def check(value: Any, *, allow_nul: bool = True) -> None:
    """Raises BadJSON if `value` nests deeper than MAX_JSON_DEPTH, or (allow_nul=False) holds a NUL."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if not allow_nul and NUL in item:
                raise BadJSON("JSON strings may not contain NUL (\\u0000) characters.")
        elif isinstance(item, dict | list):
            if depth > MAX_JSON_DEPTH:
                raise BadJSON(f"JSON may be nested at most {MAX_JSON_DEPTH} levels deep.")
            children = item.items() if isinstance(item, dict) else ((None, v) for v in item)
            for key, child in children:
                if key is not None:
                    stack.append((key, depth))
                stack.append((child, depth + 1))


def loads(raw: str | bytes, *, allow_nul: bool = True) -> Any:
    """json.loads, plus `check`. Raises ValueError (BadJSON or json's own) for anything we refuse."""
    try:
        data = json.loads(raw)
    except RecursionError:
        raise BadJSON(f"JSON may be nested at most {MAX_JSON_DEPTH} levels deep.") from None
    check(data, allow_nul=allow_nul)
    return data


def contains_nul(value: Any) -> bool:
    try:
        check(value, allow_nul=False)
    except BadJSON as exc:
        return "NUL" in str(exc)
    return False


class JSONParser(parsers.JSONParser):
    def parse(self, stream, media_type=None, parser_context=None):
        try:
            data = super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise ParseError(f"JSON parse error - nested more than {MAX_JSON_DEPTH} levels deep.") from None
        try:
            # NUL: otherwise a lookup or a save would fail in the database with a 500.
            check(data, allow_nul=False)
        except BadJSON as exc:
            raise ParseError(str(exc)) from None
        return data
