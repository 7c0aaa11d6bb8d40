"""Choosing one of a model's deployments: round-robin, smooth weighted round-robin, least-connections, random.

State is per process and per model; it only spreads load, so it need not be shared across processes.
"""

from __future__ import annotations

import random
import threading
from collections import defaultdict
from collections.abc import Sequence

from agents.llm.registry import DeploymentInfo

_lock = threading.Lock()
_rr_counter: defaultdict[str, int] = defaultdict(int)
_swrr_current: defaultdict[str, dict[int, int]] = defaultdict(dict)
_active: defaultdict[int, int] = defaultdict(int)


def _round_robin(model: str, candidates: Sequence[DeploymentInfo]) -> DeploymentInfo:
    n = _rr_counter[model]
    _rr_counter[model] = n + 1
    return candidates[n % len(candidates)]


def _smooth_weighted(model: str, candidates: Sequence[DeploymentInfo]) -> DeploymentInfo:
    """nginx's smooth weighted round-robin: every pick adds each weight, takes the max, subtracts the total."""
    current = _swrr_current[model]
    weights = {d.id: max(d.weight, 0) for d in candidates}
    total = sum(weights.values())
    if total == 0:
        return _round_robin(model, candidates)
    best = candidates[0]
    for d in candidates:
        current[d.id] = current.get(d.id, 0) + weights[d.id]
    for d in candidates[1:]:
        if current[d.id] > current[best.id]:
            best = d
    current[best.id] -= total
    return best


def _least_connections(model: str, candidates: Sequence[DeploymentInfo]) -> DeploymentInfo:
    fewest = min(_active[d.id] for d in candidates)
    tied = [d for d in candidates if _active[d.id] == fewest]
    return tied[0] if len(tied) == 1 else _round_robin(model, tied)


def _random(model: str, candidates: Sequence[DeploymentInfo]) -> DeploymentInfo:
    weights = [max(d.weight, 0) for d in candidates]
    if sum(weights) == 0:
        return random.choice(list(candidates))
    return random.choices(list(candidates), weights=weights, k=1)[0]


STRATEGIES = {
    "round_robin": _round_robin,
    "weighted": _smooth_weighted,
    "least_connections": _least_connections,
    "random": _random,
}


def choose(model: str, strategy: str, candidates: Sequence[DeploymentInfo]) -> DeploymentInfo:
    """Picks one of `candidates` (non-empty, in a stable order) by the model's strategy."""
    if len(candidates) == 1:
        return candidates[0]
    with _lock:
        return STRATEGIES.get(strategy, _smooth_weighted)(model, candidates)


def acquire(deployment_id: int) -> None:
    with _lock:
        _active[deployment_id] += 1


def release(deployment_id: int) -> None:
    with _lock:
        _active[deployment_id] = max(0, _active[deployment_id] - 1)


def active(deployment_id: int) -> int:
    return _active[deployment_id]


def reset() -> None:
    with _lock:
        _rr_counter.clear()
        _swrr_current.clear()
        _active.clear()
