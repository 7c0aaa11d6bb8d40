"""The deployed settings with the upstream call sent through the SDK's `post` (before `_Wire`): the "before" of
the second round of issue 13's CPU work.

    python -m bench.run --only 1 --compare bench.settings_before_direct_send

Puts back, in the server that loads these settings only, `AsyncOpenAI.post` per call (its request options, header
merging and URL parsing) instead of the request built from parts prepared once per client.
"""

from __future__ import annotations

from typing import Any

from agents.llm import providers
from aiwriter.settings import *  # noqa: F403


async def _sdk_post(self: Any, body: dict[str, Any]) -> Any:
    import httpx2

    return await self.client.post("/chat/completions", cast_to=httpx2.Response, body=body, stream=True)


providers._Wire.send = _sdk_post  # type: ignore[method-assign]
