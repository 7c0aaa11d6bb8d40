"""One openai.AsyncOpenAI client per provider settings per event loop (a client is bound to its loop,
and building one per call costs milliseconds and a fresh connection pool)."""

from __future__ import annotations

import asyncio
import atexit
from typing import Any

from agents.llm.providers import DemoProvider, OpenAICompatibleProvider
from agents.llm.registry import DeploymentInfo

# Held strongly, so that a finished loop's connection pools are closed by us (on the next new loop) rather than
# garbage-collected open, which aiohttp reports as an error. A server has one loop; sync code makes short ones.
_per_loop: dict[asyncio.AbstractEventLoop, dict[tuple, OpenAICompatibleProvider]] = {}
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
        _discard_closed_loops()
        clients = _per_loop[loop] = {}
    # Editing the provider (URL, key, timeout) gives a new client; the old one is dropped with its loop.
    key = (deployment.provider_id, deployment.base_url, deployment.api_key, deployment.timeout)
    adapter = clients.get(key)
    if adapter is None:
        for stale in [k for k in clients if k[0] == deployment.provider_id]:
            clients.pop(stale).discard()  # the provider was edited: its old client goes
        adapter = clients[key] = OpenAICompatibleProvider(base_url=deployment.base_url, api_key=deployment.api_key,
                                                          timeout=deployment.timeout)
    return adapter


def _discard_closed_loops() -> None:
    for loop in [loop for loop in _per_loop if loop.is_closed()]:
        for adapter in _per_loop.pop(loop).values():
            adapter.discard()


async def close_loop_clients() -> None:
    """Close this loop's clients (end of an asyncio.run, e.g. the probe command)."""
    for adapter in _per_loop.pop(asyncio.get_running_loop(), {}).values():
        adapter.discard()
        await asyncio.sleep(0)  # let the connector's close task run


def _discard_all() -> None:
    for clients in _per_loop.values():
        for adapter in clients.values():
            adapter.discard()
    _per_loop.clear()


atexit.register(_discard_all)  # else pools still open at exit are garbage-collected open, each logged as an error


def reset() -> None:
    global _demo
    _discard_all()
    _demo = None
