"""Memory retrieval: the user's earlier messages most relevant to a text.

PostgreSQL: full-text search (websearch syntax with OR between the words, ranked by ts_rank).
SQLite: a plain fallback that counts how many of the words a message contains.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from django.conf import settings
from django.contrib.postgres.search import SearchQuery, SearchRank, SearchVector
from django.db.models import Q

from conversations.models import Message

SEARCH_CONFIG = "english"
MAX_K = 20
_WORD = re.compile(r"\w{2,}", re.UNICODE)
# Words too common to say anything about relevance (SQLite fallback; PostgreSQL's config drops its own).
_STOP = frozenset("the and for are but not you your with this that what who how why can was were have has "
                  "had from they them our out its it's about into than then there their when which will".split())


@dataclass
class MemoryHit:
    message_id: int
    conversation_id: int
    role: str
    content: str
    created_at: datetime
    rank: float


def _words(text: str) -> list[str]:
    seen: dict[str, None] = {}
    for word in _WORD.findall(text.lower()):
        if word not in _STOP:
            seen.setdefault(word, None)
    return list(seen)[:32]


def _candidates(user, exclude_conversation_id: int | None):
    qs = Message.objects.filter(
        conversation__owner=user, conversation__deleted_at__isnull=True,
        role=Message.Role.USER, status=Message.Status.SUCCESS,
    )
    if exclude_conversation_id is not None:
        qs = qs.exclude(conversation_id=exclude_conversation_id)
    return qs


def search_memory(*, user, query: str, k: int | None = None,
                  exclude_conversation_id: int | None = None) -> list[MemoryHit]:
    """Top `k` of the user's earlier (successful) messages relevant to `query`, best first."""
    k = max(1, min(k or settings.MEMORY_TOP_K, MAX_K))
    words = _words(query)
    if not words:
        return []
    qs = _candidates(user, exclude_conversation_id)
    if settings.IS_POSTGRES:
        search = SearchQuery(" or ".join(words), config=SEARCH_CONFIG, search_type="websearch")
        vector = SearchVector("content", config=SEARCH_CONFIG)
        # `document=search` compiles to `to_tsvector(...) @@ query`, which the GIN index (migration 0003) serves.
        rows = (qs.annotate(document=vector, rank=SearchRank(vector, search)).filter(document=search)
                .order_by("-rank", "-created_at")[:k])
        return [_hit(m, float(m.rank)) for m in rows]
    condition = Q()
    for word in words:
        condition |= Q(content__icontains=word)
    scored = []
    for message in qs.filter(condition).order_by("-created_at")[:500]:
        text = message.content.lower()
        score = sum(1 for word in words if word in text) / len(words)
        scored.append((score, message))
    scored.sort(key=lambda pair: (-pair[0], -pair[1].created_at.timestamp()))
    return [_hit(m, score) for score, m in scored[:k]]


def _hit(message: Message, rank: float) -> MemoryHit:
    return MemoryHit(message_id=message.pk, conversation_id=message.conversation_id, role=message.role,
                     content=message.content, created_at=message.created_at, rank=round(rank, 6))


def memory_prompt(hits: list[MemoryHit]) -> str:
    """The block added to the system prompt."""
    lines = "\n".join(f"- {hit.content.strip()[:1000]}" for hit in hits)
    return "Relevant things the user said in earlier conversations:\n" + lines
