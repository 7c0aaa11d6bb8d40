"""Prometheus metrics, the `/metrics` view and `Server-Timing` headers.

Metrics others may feed:
    OPEN_WEBSOCKETS.inc() / .dec()          open websocket connections (or websocket_opened/closed(), or
                                            wrap the websocket app in track_websockets() to count them all)
    with timing("quota"): ...               adds a phase to the Server-Timing header of the current request

Model-call metrics are fed from a post_save signal on usage.UsageRecord (one row per model call), so
no entry point has to remember to count. Deployment health is read at scrape time from
agents.selectors.deployment_health(). This module is the base layer: AiwriterConfig.ready() hands it both
(connect()), so it imports neither app.

Processes: each daphne process keeps its own registry and serves its own `/metrics`; scrape every
process. With PROMETHEUS_MULTIPROC_DIR set (an empty directory, before start) prometheus-client's
multiprocess mode aggregates all processes writing there, and any process's `/metrics` shows the sum.
"""

from __future__ import annotations

import contextvars
import hmac
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings
from django.db import transaction
from django.http import HttpRequest, HttpResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from aiwriter.errors import error_response

logger = logging.getLogger(__name__)

# Buckets in seconds, finer at the low end: a gateway's own overhead lives in the milliseconds.
_HTTP_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_MODEL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120)

HTTP_REQUESTS = Counter("aiwriter_http_requests", "HTTP requests served.", ["route", "method", "status"])
HTTP_ERRORS = Counter("aiwriter_http_errors", "HTTP responses with status >= 500.", ["route", "method"])
HTTP_LATENCY = Histogram("aiwriter_http_request_duration_seconds", "Time to the response headers.",
                         ["route", "method"], buckets=_HTTP_BUCKETS)

_MODEL_LABELS = ["model", "provider"]
MODEL_REQUESTS = Counter("aiwriter_model_requests", "Metered model calls.", [*_MODEL_LABELS, "entry_point", "status"])
MODEL_ERRORS = Counter("aiwriter_model_errors", "Model calls that failed.", [*_MODEL_LABELS, "code"])
MODEL_LATENCY = Histogram("aiwriter_model_latency_seconds", "Model call duration.", _MODEL_LABELS,
                          buckets=_MODEL_BUCKETS)
MODEL_TTFT = Histogram("aiwriter_model_ttft_seconds", "Model call time to first token.", _MODEL_LABELS,
                       buckets=_MODEL_BUCKETS)
MODEL_TOKENS = Counter("aiwriter_model_tokens", "Tokens by kind (prompt, cached_prompt, completion).",
                       [*_MODEL_LABELS, "kind"])
MODEL_COST = Counter("aiwriter_model_cost", "Cost of model calls, in settings.CURRENCY.", _MODEL_LABELS)
MODEL_CACHE_HITS = Counter("aiwriter_model_cache_hits", "Model calls answered from the response cache.",
                           _MODEL_LABELS)
# livesum: in multiprocess mode the gauge is the sum over live processes.
OPEN_WEBSOCKETS = Gauge("aiwriter_open_websockets", "Open websocket connections.", multiprocess_mode="livesum")


def websocket_opened() -> None:
    OPEN_WEBSOCKETS.inc()


def websocket_closed() -> None:
    OPEN_WEBSOCKETS.dec()


def track_websockets(app: Callable) -> Callable:
    """ASGI wrapper that keeps OPEN_WEBSOCKETS right for every socket it serves, whatever the consumer:
    `"websocket": track_websockets(AllowedHostsOriginValidator(...))` in aiwriter/asgi.py."""

    async def wrapper(scope: dict, receive: Callable, send: Callable) -> Any:
        if scope["type"] != "websocket":
            return await app(scope, receive, send)
        accepted = False

        async def counting_send(message: dict) -> None:
            nonlocal accepted
            if message["type"] == "websocket.accept" and not accepted:
                accepted = True
                OPEN_WEBSOCKETS.inc()
            await send(message)

        try:
            return await app(scope, receive, counting_send)
        finally:
            if accepted:
                OPEN_WEBSOCKETS.dec()

    return wrapper


# --- model calls, from UsageRecord rows --------------------------------------------------------
def observe_usage_record(record: Any) -> None:
    """Counts one model call. Never raises: metrics must not break billing."""
    try:
        labels = {"model": record.model or "unknown", "provider": record.provider or "unknown"}
        MODEL_REQUESTS.labels(**labels, entry_point=record.entry_point or "", status=record.status).inc()
        if record.status == "error":
            MODEL_ERRORS.labels(**labels, code=record.error_code or "error").inc()
        if record.latency_ms is not None:
            MODEL_LATENCY.labels(**labels).observe(record.latency_ms / 1000)
        if record.ttft_ms is not None:
            MODEL_TTFT.labels(**labels).observe(record.ttft_ms / 1000)
        cached_prompt = record.cached_prompt_tokens or 0
        MODEL_TOKENS.labels(**labels, kind="prompt").inc(max(0, (record.prompt_tokens or 0) - cached_prompt))
        MODEL_TOKENS.labels(**labels, kind="cached_prompt").inc(cached_prompt)
        MODEL_TOKENS.labels(**labels, kind="completion").inc(record.completion_tokens or 0)
        if record.cost:
            MODEL_COST.labels(**labels).inc(float(record.cost))
        if record.cached:
            MODEL_CACHE_HITS.labels(**labels).inc()
    except Exception:  # noqa: BLE001 - a metrics bug is logged, never propagated into the charge
        logger.exception("could not record model-call metrics")


def _usage_record_saved(sender: type, instance: Any, created: bool, **kwargs: Any) -> None:
    if not created:
        return
    # After commit: a rolled-back charge was never a call the user paid for.
    transaction.on_commit(lambda: observe_usage_record(instance), using=kwargs.get("using"))


# --- scrape-time collectors ----------------------------------------------------------------------
class DeploymentHealthCollector(Collector):
    """Breaker state per deployment, read at scrape time from agents.selectors.deployment_health()."""

    _STATES = ("closed", "half_open", "open")
    rows: Callable[[], Iterable[Any]] | None = None  # set by connect()

    def describe(self) -> list:
        return []  # registering must not call collect(): no DB access while apps load

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if self.rows is None:
            return
        try:
            rows = list(self.rows())
        except Exception:  # noqa: BLE001 - a scrape must still answer with the other metrics
            logger.exception("deployment_health() failed during a metrics scrape")
            return
        breaker = GaugeMetricFamily("aiwriter_deployment_breaker_state",
                                    "1 for the breaker's current state of each deployment.",
                                    labels=["deployment", "model", "provider", "state"])
        healthy = GaugeMetricFamily("aiwriter_deployment_healthy", "1 if the deployment takes traffic.",
                                    labels=["deployment", "model", "provider"])
        for row in rows:
            ident = [str(row.deployment_id), row.model, row.provider]
            for candidate in self._STATES:
                breaker.add_metric([*ident, candidate], 1.0 if candidate == row.breaker_state else 0.0)
            healthy.add_metric(ident, 1.0 if row.healthy else 0.0)
        yield breaker
        yield healthy


_health_collector = DeploymentHealthCollector()


def connect(usage_record: type, deployment_health: Callable[[], Iterable[Any]]) -> None:
    """Wires the signal on `usage_record` (the UsageRecord model) and the scrape-time collector reading
    `deployment_health` (agents.selectors.deployment_health). Called once from AiwriterConfig.ready()."""
    from django.db.backends.signals import connection_created
    from django.db.models.signals import post_save

    _health_collector.rows = deployment_health
    post_save.connect(_usage_record_saved, sender=usage_record, dispatch_uid="aiwriter.observability.usage")
    connection_created.connect(_install_db_timer, dispatch_uid="aiwriter.observability.db_timer")
    try:
        REGISTRY.register(_health_collector)
    except ValueError:
        pass  # already registered (ready() ran twice, e.g. in tests)


# --- /metrics ------------------------------------------------------------------------------------
def _authorized(request: HttpRequest) -> int:
    """200 if allowed, else the status to answer with (401 no/invalid credentials, 403 not staff)."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        expected = settings.METRICS_TOKEN
        if expected and hmac.compare_digest(token.strip().encode(), expected.encode()):
            return 200
        return 401
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return 401
    return 200 if user.is_staff else 403


def metrics_view(request: HttpRequest) -> HttpResponse:
    """Prometheus text format, for staff (session) or `Authorization: Bearer <METRICS_TOKEN>`."""
    status = _authorized(request)
    if status == 401:
        response = error_response("not_authenticated", "Staff login or the metrics token is required.", 401)
        response["WWW-Authenticate"] = "Bearer"
        return response
    if status == 403:
        return error_response("permission_denied", "Only staff may read metrics.", 403)
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        registry.register(_health_collector)
    else:
        registry = REGISTRY
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)


# --- Server-Timing -------------------------------------------------------------------------------
class _Timings:
    __slots__ = ("phases", "db_ms", "db_queries")

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self.db_ms = 0.0
        self.db_queries = 0

    def add(self, name: str, ms: float) -> None:
        self.phases[name] = self.phases.get(name, 0.0) + ms

    def header(self, total_ms: float) -> str:
        parts = [f"app;dur={total_ms:.1f}", f'db;dur={self.db_ms:.1f};desc="{self.db_queries} queries"']
        parts += [f"{name};dur={ms:.1f}" for name, ms in self.phases.items()]
        return ", ".join(parts)


# Shared by reference with the threads sync_to_async runs DB work in (it copies the context).
_current: contextvars.ContextVar[_Timings | None] = contextvars.ContextVar("aiwriter_timings", default=None)


@contextmanager
def timing(name: str) -> Iterator[None]:
    """Adds the time spent inside to the current request's Server-Timing as `name` (no-op outside one).

    `name` must be a token (letters, digits, `_`, `-`): auth, quota, upstream, metering, ...
    Works in sync and async code; the same name twice is summed.
    """
    timings = _current.get()
    if timings is None:
        yield
        return
    started = time.perf_counter()
    try:
        yield
    finally:
        timings.add(name, (time.perf_counter() - started) * 1000)


def add_timing(name: str, ms: float) -> None:
    """Adds a phase measured elsewhere (e.g. the upstream's latency) to the current request."""
    timings = _current.get()
    if timings is not None:
        timings.add(name, ms)


def add_db_query(ms: float) -> None:
    """A query run outside the ORM (the async pool, aiwriter.dbpool): counted in the `db` figure too."""
    timings = _current.get()
    if timings is not None:
        timings.db_ms += ms
        timings.db_queries += 1


def _db_timer(execute: Callable, sql: str, params: Any, many: bool, context: dict) -> Any:
    timings = _current.get()
    if timings is None:
        return execute(sql, params, many, context)
    started = time.perf_counter()
    try:
        return execute(sql, params, many, context)
    finally:
        timings.db_ms += (time.perf_counter() - started) * 1000
        timings.db_queries += 1


def _install_db_timer(sender: Any, connection: Any, **kwargs: Any) -> None:
    # Kept on the connection wrapper for its life; connect() runs again with a pool, so add it once.
    if _db_timer not in connection.execute_wrappers:
        connection.execute_wrappers.append(_db_timer)


def _route(request: HttpRequest) -> str:
    match = getattr(request, "resolver_match", None)
    if match is None:
        return "unmatched"
    return "/" + match.route if match.route else (match.view_name or "unmatched")


class ObservabilityMiddleware:
    """HTTP metrics by route and a Server-Timing header (app total, DB time, named phases).

    Outermost, so `app` covers the whole Django stack. For streamed responses the figures cover the
    time until the headers go out (the stream itself is measured by the model-call metrics).
    """

    async_capable = True
    sync_capable = True

    def __init__(self, get_response: Callable) -> None:
        self.get_response = get_response
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        if iscoroutinefunction(self):
            return self.__acall__(request)
        timings, token, started = self._start()
        try:
            response = self.get_response(request)
        finally:
            _current.reset(token)
        return self._finish(request, response, timings, started)

    async def __acall__(self, request: HttpRequest) -> HttpResponse:
        timings, token, started = self._start()
        try:
            response = await self.get_response(request)
        finally:
            _current.reset(token)
        return self._finish(request, response, timings, started)

    @staticmethod
    def _start() -> tuple[_Timings, contextvars.Token, float]:
        timings = _Timings()
        return timings, _current.set(timings), time.perf_counter()

    @staticmethod
    def _finish(request: HttpRequest, response: HttpResponse, timings: _Timings, started: float) -> HttpResponse:
        elapsed = time.perf_counter() - started
        route, method = _route(request), request.method or ""
        HTTP_REQUESTS.labels(route=route, method=method, status=str(response.status_code)).inc()
        HTTP_LATENCY.labels(route=route, method=method).observe(elapsed)
        if response.status_code >= 500:
            HTTP_ERRORS.labels(route=route, method=method).inc()
        response["Server-Timing"] = timings.header(elapsed * 1000)
        return response
