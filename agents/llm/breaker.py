"""A circuit breaker per deployment: closed → open after N consecutive failures → half-open after the
recovery timeout (one trial call at a time) → closed on a success, open again on a failure.

The open state is shared by all processes through Redis (one hash, `<prefix>:llm:breakers`, a field per deployment:
`open:<opened_at>:<failures>:<recovery>`, or `closed:<opened_at>` once a trial closed that pause; opened_at on the
wall clock), so a restarted process, or another daphne, sees a deployment as open.

The hot path gains no Redis round trip: a process writes only when its breaker opens or closes, and reads the whole
hash at most once a second in the background (only the first read after a start blocks, so a restarted process
knows from its first call). All Redis work runs in order on one worker thread. What stays per process: the count of
failures before the threshold, and the half-open trial slot (each process may send one trial). Without REDIS_URL,
or while Redis fails (aiwriter.redis_guard), breakers are per process as before; what opened meanwhile is written
when Redis answers again.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, NamedTuple

from django.conf import settings

from aiwriter import redis_guard
from aiwriter.redis import get_redis
from aiwriter.redis import key as redis_key

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"
REFRESH_SECONDS = 1.0  # how stale a process's view of the other processes' breakers may get
WAIT_SECONDS = 3.0  # a synchronous caller waits this long at most for the store (the client's timeouts are 1 s)

logger = logging.getLogger(__name__)

# Each write wins only over an older pause: a process that closes a stale pause must not erase a newer one opened
# elsewhere. A close leaves a marker, so a store that lost its data (an emptied Redis) is not read as "closed".
_WRITE = """
local v = redis.call('HGET', KEYS[1], ARGV[1])
local stored = v and tonumber(string.match(v, '^%a+:([^:]+)'))
if not stored or stored < tonumber(ARGV[2]) or (stored == tonumber(ARGV[2]) and ARGV[3] == 'closed') then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[4])
end
return 0
"""


class Shared(NamedTuple):
    """One deployment's last pause as the shared store holds it: open, or closed by a successful trial."""

    opened_wall: float
    failures: int
    recovery: float
    closed: bool = False


@dataclass
class CircuitBreaker:
    threshold: int = 5
    recovery: float = 30.0
    failures: int = 0
    opened_at: float | None = None  # time.monotonic()
    trial_in_flight: bool = False
    # Set for the breakers of get(): they share their open state. A bare CircuitBreaker stays in process.
    deployment_id: int | None = None
    opened_wall: float | None = None  # opened_at on the wall clock: what the store keeps
    stored_wall: float | None = None  # the open state the store is known to hold (after its publish succeeded)
    stored_seq: int = 0  # the store operation that published it
    closed_wall: float | None = None  # the last open state this process closed: an older view must not reopen it
    seen_version: int = 0  # the shared view last merged

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return CLOSED
        if time.monotonic() - self.opened_at >= self.recovery:
            return HALF_OPEN
        return OPEN

    def allow(self) -> bool:
        """May a call go to this deployment now? In half-open, only one trial call at a time."""
        state = self.state
        if state == CLOSED:
            return True
        if state == HALF_OPEN and not self.trial_in_flight:
            self.trial_in_flight = True
            return True
        return False

    def available(self) -> bool:
        """Like allow() but without taking the half-open trial slot (for filtering candidates)."""
        state = self.state
        return state == CLOSED or (state == HALF_OPEN and not self.trial_in_flight)

    def success(self) -> None:
        was_open = self.opened_wall if self.opened_at is not None else None
        self.failures = 0
        self.opened_at = None
        self.trial_in_flight = False
        if was_open is not None:
            self.opened_wall = None
            self.closed_wall = was_open
            if self.deployment_id is not None:
                _publish_close(self.deployment_id, was_open)

    def failure(self) -> None:
        self.trial_in_flight = False
        if self.opened_at is not None:  # a failed trial (or a late failure) re-opens for a full pause
            self._open()
            return
        self.failures += 1
        if self.failures >= self.threshold:
            self._open()

    def release_trial(self) -> None:
        """A trial that ended without a verdict (client error, cancellation) frees the slot."""
        self.trial_in_flight = False

    def _open(self) -> None:
        self.opened_at = time.monotonic()
        self.opened_wall = round(time.time(), 6)
        if self.deployment_id is not None:
            _publish_open(self)

    def _merge(self, view: dict[int, Shared], view_seq: int) -> None:
        """Takes in what other processes did since the last view (called on the caller's own thread)."""
        assert self.deployment_id is not None
        shared = view.get(self.deployment_id)
        mine = self.opened_wall if self.opened_at is not None else None
        if shared is not None and shared.closed:
            if mine is not None and mine <= shared.opened_wall:  # another process's trial closed this pause
                self.closed_wall, self.opened_wall, self.opened_at, self.failures = mine, None, None, 0
                self.trial_in_flight = False
                return
        elif shared is not None and shared.opened_wall > max(mine or 0.0, self.closed_wall or 0.0):
            # Opened (or re-opened) elsewhere, later than anything this process saw.
            self.opened_at = time.monotonic() - max(0.0, time.time() - shared.opened_wall)
            self.opened_wall = self.stored_wall = shared.opened_wall
            self.stored_seq = view_seq
            self.failures = max(self.failures, shared.failures)
            return
        if mine is not None and (shared is None or shared.opened_wall < mine) and (
                self.stored_wall != mine or view_seq > self.stored_seq):
            _publish_open(self)  # opened while the store was unreachable, or the store lost it


# --- The registry and the shared store ---------------------------------------------------------------------------

_breakers: dict[int, CircuitBreaker] = {}
_lock = threading.Lock()


class View(NamedTuple):
    """The store as last read; replaced whole (one assignment), so a reader never sees half of two reads."""

    version: int  # bumped by each successful read
    seq: int  # the store operation that read it
    shared: dict[int, Shared]


_view = View(0, 0, {})
_generation = 0  # bumped by reset(): a read started before it is dropped
_next_refresh = 0.0  # time.monotonic() after which the view is read again
_tried = False  # the store was read (or tried) since the start or reset
_refreshing: Future[None] | None = None
_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()
_op_seq = itertools.count(1)  # store operations in the order the worker thread ran them


def get(deployment_id: int, *, threshold: int = 5, recovery: float = 30.0) -> CircuitBreaker:
    _maybe_refresh()
    breaker = _breakers.get(deployment_id)
    if breaker is None:
        with _lock:
            breaker = _breakers.setdefault(deployment_id, CircuitBreaker(threshold=threshold, recovery=recovery,
                                                                         deployment_id=deployment_id))
    # Settings edited in the admin apply from the next call.
    breaker.threshold, breaker.recovery = threshold, recovery
    if breaker.seen_version != _view.version:  # checked inline: this runs a few times per call
        _catch_up(breaker)
    return breaker


def state_of(deployment_id: int) -> str:
    _maybe_refresh()
    breaker = _breakers.get(deployment_id)
    if breaker is not None:
        _catch_up(breaker)
        return breaker.state
    shared = _view.shared.get(deployment_id)  # never called here: as the process that opened it says
    if shared is None or shared.closed:
        return CLOSED
    return HALF_OPEN if time.time() - shared.opened_wall >= shared.recovery else OPEN


def _catch_up(breaker: CircuitBreaker) -> None:
    view = _view
    if breaker.seen_version != view.version:
        breaker.seen_version = view.version
        breaker._merge(view.shared, view.seq)


def refresh() -> None:
    """Reads the shared store now (and waits for it): for pages that must show the latest state."""
    global _next_refresh
    _next_refresh = 0.0
    _maybe_refresh(wait=True)


def reset() -> None:
    """Forgets this process's breakers, as a restart does; the shared store keeps its state."""
    global _view, _generation, _next_refresh, _tried, _refreshing
    _drain()
    with _lock:
        _breakers.clear()
        _view, _next_refresh, _tried, _refreshing = View(0, 0, {}), 0.0, False, None
        _generation += 1


def _shared_enabled() -> bool:
    return bool(settings.REDIS_URL) and redis_guard.available()


def _in_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _maybe_refresh(*, wait: bool | None = None) -> None:
    """Reads the store at most once a second: in the background on the event loop (the first read after a start
    excepted), else synchronously."""
    global _next_refresh, _refreshing
    now = time.monotonic()
    if now < _next_refresh:
        return
    if not _shared_enabled():
        _next_refresh = now + REFRESH_SECONDS  # asked again in a second, not on each call
        return
    with _lock:
        if now < _next_refresh:
            return
        _next_refresh = now + REFRESH_SECONDS
        pending = _refreshing if _refreshing is not None and not _refreshing.done() else None
        if pending is None:
            pending = _refreshing = _submit(_read_view, _generation)
    if wait is None:
        wait = not _tried or not _in_event_loop()
    if wait:
        _wait(pending)


def _read_view(generation: int) -> None:
    global _view, _tried
    client = get_redis()
    if client is None or not redis_guard.available():
        return
    seq = next(_op_seq)
    try:
        raw: dict[bytes, bytes] = client.hgetall(redis_key("llm", "breakers"))  # type: ignore[assignment]
    except Exception as exc:  # noqa: BLE001 - any Redis failure: keep the last view, breakers work per process
        redis_guard.failed("circuit breakers", exc)
        _tried = True  # the event loop waits for the first read only, not for each retry of an unreachable store
        return
    view: dict[int, Shared] = {}
    for field, value in raw.items():
        try:
            kind, wall, *rest = value.decode().split(":")
            if kind == "closed":
                view[int(field)] = Shared(float(wall), 0, 0.0, closed=True)
            else:
                failures, recovery = rest
                view[int(field)] = Shared(float(wall), int(failures), float(recovery))
        except ValueError:
            continue  # not ours to understand: ignore, don't fail the call
    with _lock:
        if generation == _generation:
            _view, _tried = View(_view.version + 1, seq, view), True


def _publish_open(breaker: CircuitBreaker) -> None:
    if not _shared_enabled() or breaker.opened_wall is None:
        return
    wall = breaker.opened_wall
    args = [breaker.deployment_id, wall, "open", f"open:{wall}:{breaker.failures}:{breaker.recovery}"]

    def publish() -> None:
        seq = _run_script(args)
        if seq is not None and breaker.opened_wall == wall:
            breaker.stored_wall, breaker.stored_seq = wall, seq

    _submit_and_maybe_wait(publish)


def _publish_close(deployment_id: int, opened_wall: float) -> None:
    if _shared_enabled():
        args = [deployment_id, opened_wall, "closed", f"closed:{opened_wall}"]
        _submit_and_maybe_wait(lambda: _run_script(args))


def _run_script(args: list[Any]) -> int | None:
    """Writes one deployment's pause on the worker thread; returns the operation number, None if Redis failed."""
    client = get_redis()
    if client is None or not redis_guard.available():
        return None
    seq = next(_op_seq)
    try:
        client.eval(_WRITE, 1, redis_key("llm", "breakers"), *args)
    except Exception as exc:  # noqa: BLE001 - the breaker keeps working in this process
        redis_guard.failed("circuit breakers", exc)
        return None
    return seq


def _submit(fn: Callable[..., None], *args: Any) -> Future[None]:
    global _executor
    if _executor is None:
        with _executor_lock:
            if _executor is None:
                _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="breaker-store")
    return _executor.submit(fn, *args)


def _submit_and_maybe_wait(fn: Callable[[], Any]) -> None:
    """On the event loop the call goes on at once; elsewhere it waits (tests and the admin see their own write)."""
    future = _submit(fn)
    if not _in_event_loop():
        _wait(future)


def _wait(future: Future[Any]) -> None:
    try:
        future.result(timeout=WAIT_SECONDS)
    except FutureTimeout:
        logger.warning("The circuit breaker store did not answer within %ss", WAIT_SECONDS)


def _drain() -> None:
    """Waits for the store operations already queued (they run in order on one thread)."""
    if _executor is not None:
        _wait(_executor.submit(lambda: None))
