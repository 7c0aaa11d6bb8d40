"""Memory retrieval: the user's earlier messages most relevant to a text.

PostgreSQL: full-text search (websearch syntax with OR between the words, ranked by ts_rank).
SQLite: a plain fallback that counts how many of the words a message contains.

`search_statement` is the PostgreSQL search as one SQL statement, for the chat turn's prompt build on the async
pool (conversations.prompt): the ORM query's WHERE, ranking and order, written out (tests/test_chat_prompt_pool.py
checks both give the same hits).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.conf import settings
from django.contrib.postgres.search import SearchQuery, SearchRank, SearchVector
from django.db.models import Q

from conversations.models import Conversation, Message

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


def _top_k(k: int | None) -> int:
    return max(1, min(k or settings.MEMORY_TOP_K, MAX_K))


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
    k = _top_k(k)
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


def search_statement(*, user_id: int, query: str, k: int | None = None,
                     exclude_conversation_id: int | None = None) -> tuple[str, list[Any]] | None:
    """search_memory's PostgreSQL query as (sql, params) for the async pool; None when the query has no words
    (no hits, nothing to ask). Its rows: (id, conversation_id, role, content, created_at, rank), best first."""
    words = _words(query)
    if not words:
        return None
    messages, conversations = Message._meta.db_table, Conversation._meta.db_table
    # The same expressions as the ORM's SearchVector / SearchQuery(websearch) / SearchRank: the GIN index
    # (migration 0003) serves `to_tsvector('english', COALESCE(content, '')) @@ query`.
    document = "to_tsvector(%s::regconfig, COALESCE(m.content, ''))"
    search = "websearch_to_tsquery(%s::regconfig, %s)"
    text = " or ".join(words)
    sql = (f"SELECT m.id, m.conversation_id, m.role, m.content, m.created_at, "
           f"ts_rank({document}, {search}) AS rank "
           f'FROM "{messages}" m INNER JOIN "{conversations}" c ON m.conversation_id = c.id '
           f"WHERE c.deleted_at IS NULL AND c.owner_id = %s AND m.role = %s AND m.status = %s ")
    params: list[Any] = [SEARCH_CONFIG, SEARCH_CONFIG, text, user_id, Message.Role.USER, Message.Status.SUCCESS]
    if exclude_conversation_id is not None:
        sql += "AND NOT (m.conversation_id = %s) "
        params.append(exclude_conversation_id)
    sql += f"AND {document} @@ ({search}) ORDER BY rank DESC, m.created_at DESC LIMIT %s"
    params += [SEARCH_CONFIG, SEARCH_CONFIG, text, _top_k(k)]
    return sql, params


def hits_from_rows(rows: list[tuple[Any, ...]]) -> list[MemoryHit]:
    """The hits of search_statement's rows, as search_memory gives them."""
    return [MemoryHit(message_id=row[0], conversation_id=row[1], role=row[2], content=row[3], created_at=row[4],
                      rank=round(float(row[5]), 6)) for row in rows]


def memory_prompt(hits: list[MemoryHit]) -> str:
    """The block added to the system prompt."""
    lines = "\n".join(f"- {hit.content.strip()[:1000]}" for hit in hits)
    return "Relevant things the user said in earlier conversations:\n" + lines
