"""Pluggable moderation hook: a callable `(text) -> reason | None` named by settings.MODERATION_HOOK.

The shipped hook rejects text containing any word or phrase of settings.MODERATION_BLOCKLIST
(comma-separated, case-insensitive). Swap in a classifier or a provider's moderation API by pointing
MODERATION_HOOK at another callable with the same signature.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import lru_cache

from django.conf import settings
from django.utils.module_loading import import_string

DEFAULT_HOOK = "conversations.moderation.blocklist"


def blocklist(text: str) -> str | None:
    pattern = _blocklist_pattern(tuple(settings.MODERATION_BLOCKLIST))
    if pattern is not None and pattern.search(text):
        return "The message contains blocked content."
    return None


@lru_cache(maxsize=8)
def _blocklist_pattern(words: tuple[str, ...]) -> re.Pattern | None:
    words = tuple(w for w in words if w)
    if not words:
        return None
    # Whole words/phrases only: "ass" must not block "class".
    return re.compile(r"(?<!\w)(?:" + "|".join(re.escape(w) for w in words) + r")(?!\w)", re.IGNORECASE)


@lru_cache(maxsize=4)
def _hook(path: str) -> Callable[[str], str | None]:
    return import_string(path)


def check(text: str) -> str | None:
    """The reason the text is rejected, or None when it may be sent to the model."""
    return _hook(getattr(settings, "MODERATION_HOOK", DEFAULT_HOOK))(text)
