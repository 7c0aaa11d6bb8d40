"""The deployed settings with Django's choices passed to psycopg as they are: the "before" of usage.hotpath._plain
(issue 13, /v1 CPU).

    python -m bench.run --only none --compare bench.settings_before_plain_params

usage.hotpath imports the models, so it is patched once the apps are ready: when Django loads the middleware,
through RequestIdMiddleware itself under another name (no extra work per request).
"""

from __future__ import annotations

from typing import Any

from aiwriter.settings import *  # noqa: F403

MIDDLEWARE = [f"{__name__}.RequestIdMiddleware" if m == "aiwriter.middleware.RequestIdMiddleware" else m
              for m in MIDDLEWARE]  # noqa: F405


def _as_is(params: Any) -> list[Any]:
    return list(params)


def patch() -> None:
    from usage import hotpath

    hotpath._plain = _as_is


def __getattr__(name: str) -> Any:
    """RequestIdMiddleware, as aiwriter.middleware has it, once hotpath is patched (the apps are ready by then)."""
    if name != "RequestIdMiddleware":
        raise AttributeError(name)
    from aiwriter.middleware import RequestIdMiddleware

    patch()
    globals()[name] = RequestIdMiddleware
    return RequestIdMiddleware
