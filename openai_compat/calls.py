"""/v1 and the writer's side of the call pipeline (usage.pipeline): which target a model name means for the
key (openai_compat.targets, cached in this process by hotcache); the rest is the pipeline every entry point
shares, re-exported here under the names /v1 and the writer use.
"""

from __future__ import annotations

from typing import Any

from asgiref.sync import sync_to_async

from aiwriter.db import released
from openai_compat import hotcache
from openai_compat.targets import resolve_target
from usage import pipeline
from usage.pipeline import (  # noqa: F401 - the names /v1, the writer and their tests use
    ContextLengthExceeded,
    PreparedCall,
    build_request,
    tokens_used,
)


async def prepare_call(*, account: Any, api_key: Any, model_name: str, messages: list[dict[str, Any]],
                       entry_point: str, max_tokens: int | None = None,
                       options: dict[str, Any] | None = None) -> PreparedCall:
    """Resolves the target (ModelNotFound if unknown or not allowed for the key), then prepares the call
    (usage.pipeline.prepare: request, context window, key limits). Makes one query, none when the target is in
    this process's cache (hotcache)."""
    target = hotcache.get_target(model_name, api_key)  # on the loop: no query, no thread hop
    if target is None:
        target = await sync_to_async(released(resolve_target))(model_name, api_key)
        hotcache.put_target(model_name, api_key, target)
    return await pipeline.prepare(target, messages, account=account, api_key=api_key, entry_point=entry_point,
                                  max_tokens=max_tokens, options=options)


finish_call = pipeline.finish
refused_call = pipeline.refused
