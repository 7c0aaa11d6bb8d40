"""One openai.AsyncOpenAI client per provider settings per event loop (a client is bound to its loop,
and building one per call costs milliseconds and a fresh connection pool)."""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

from agents.llm.providers import DemoProvider, OpenAICompatibleProvider
from agents.llm.registry import DeploymentInfo

_per_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[Any, ...], OpenAICompatibleProvider]] = (
    weakref.WeakKeyDictionary())
_demo = None


def adapter_for(deployment: DeploymentInfo) -> Any:
    """The provider adapter for a deployment: the demo, or an OpenAI-compatible one with a shared client."""
    global _demo
    if deployment.kind == "demo":
        if _demo is None:
            _demo = DemoProvider()
        return _demo
    loop = asyncio.get_running_loop()
    clients = _per_loop.get(loop)
    if clients is None:
        clients = _per_loop[loop] = {}
    # Editing the provider (URL, key, timeout) gives a new client; the old one is dropped with its loop.
    key = (deployment.provider_id, deployment.base_url, deployment.api_key, deployment.timeout)
    adapter = clients.get(key)
    if adapter is None:
        for stale in [k for k in clients if k[0] == deployment.provider_id]:
            del clients[stale]  # the provider was edited: its old client goes
        adapter = clients[key] = OpenAICompatibleProvider(base_url=deployment.base_url, api_key=deployment.api_key,
                                                          timeout=deployment.timeout)
    return adapter


def reset() -> None:
    global _demo
    _per_loop.clear()
    _demo = None
