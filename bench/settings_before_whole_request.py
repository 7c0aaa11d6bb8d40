"""The deployed settings with a whole reply read from an upstream SSE stream again: the "before" of the
non-streamed upstream request (issue 13, /v1 CPU).

    python -m bench.run --only none --compare bench.settings_before_whole_request

In the server that loads these settings only, service calls that want the whole reply (`whole=True`: /v1 without
`stream`, the writer, debug runs) stream it from the upstream and read it event by event, as the streamed path does.
"""

from __future__ import annotations

from agents.llm import providers
from aiwriter.settings import *  # noqa: F403

providers.OpenAICompatibleProvider.complete = None  # type: ignore[assignment, method-assign]
