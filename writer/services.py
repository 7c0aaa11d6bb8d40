"""Writer tasks: each builds one prompt and makes one metered call (entry point "writer").

Instructions go in the user message, not a system message, so that an agent's own system prompt
(which replaces any system message) still applies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from agents.llm import errors as llm_errors
from agents.llm.types import LLMError
from aiwriter.errors import ApiError
from aiwriter.money import money_str
from openai_compat import calls
from openai_compat.targets import AGENT_PREFIX
from usage import pipeline
from usage.metering import MeteredResult


@dataclass
class WriterResult:
    metered: MeteredResult

    @property
    def text(self) -> str:
        return self.metered.result.content

    def as_dict(self, **payload: Any) -> dict[str, Any]:
        result = self.metered.result
        return {**payload, "model": result.model, "usage": result.usage.as_dict(), "cost": money_str(self.metered.cost)}


def target_name(*, agent: str | None = None, model: str | None = None) -> str:
    return AGENT_PREFIX + agent if agent else str(model)


def api_error(exc: LLMError) -> ApiError:
    """A model failure in our REST shape; status and retryability from the one table (agents/llm/errors.py)."""
    spec = llm_errors.spec(exc.code)
    headers = {"Retry-After": str(max(1, round(exc.retry_after)))} if exc.retry_after else None
    return ApiError(exc.message, code=exc.code, status_code=spec.http_status, retryable=spec.retryable,
                    headers=headers)


async def _run(*, user: Any, api_key: Any, target: str, prompt: str, workflow_type: str,
               max_tokens: int | None = None) -> WriterResult:
    """Routes, limits and meters one call; an LLMError becomes an ApiError in our error shape."""
    try:
        call = await calls.prepare_call(account=user, api_key=api_key, model_name=target,
                                        messages=[{"role": "user", "content": prompt}], entry_point="writer",
                                        max_tokens=max_tokens)
        call.ctx.workflow_type = workflow_type
        metered = await pipeline.run_complete(call)
    except LLMError as exc:
        raise api_error(exc) from exc
    return WriterResult(metered)


async def generate_text(*, user: Any, api_key: Any, target: str, prompt: str,
                        max_tokens: int | None = None) -> WriterResult:
    return await _run(user=user, api_key=api_key, target=target, prompt=prompt, max_tokens=max_tokens,
                      workflow_type="generate_text")


def topics_prompt(subject: str, count: int) -> str:
    return (f"Suggest {count} distinct topic ideas for articles about the subject below. "
            "Answer with one topic per line and nothing else: no numbering, no introduction.\n\n"
            f"Subject: {subject}")


_LIST_MARKER = re.compile(r"^\s*(?:[-*•]+|\d+[.)]|#+)\s*")


def parse_topics(text: str, count: int) -> list[str]:
    """One topic per non-empty line, list markers and wrapping quotes removed, duplicates dropped."""
    topics: list[str] = []
    for line in text.splitlines():
        topic = _LIST_MARKER.sub("", line).strip().strip("\"'“”").strip()
        if topic and topic not in topics:
            topics.append(topic)
    return topics[:count]


async def suggest_topics(*, user: Any, api_key: Any, target: str, subject: str, count: int = 5,
                         ) -> tuple[list[str], WriterResult]:
    result = await _run(user=user, api_key=api_key, target=target, prompt=topics_prompt(subject, count),
                        workflow_type="topics")
    return parse_topics(result.text, count), result


def optimize_prompt(content: str, goal: str) -> str:
    return (f"Rewrite the content below for this goal: {goal}\n"
            "Keep its meaning, facts and language. Answer with the rewritten content only.\n\n"
            f"Content:\n{content}")


async def optimize_content(*, user: Any, api_key: Any, target: str, content: str, goal: str) -> WriterResult:
    return await _run(user=user, api_key=api_key, target=target, prompt=optimize_prompt(content, goal),
                      workflow_type="optimize")
