"""Writes that must outlive a short database outage: retried by one background thread until they land.

A reply's final state and a served call's usage record are facts the client has already been told (the final
frame went out first); if PostgreSQL is unreachable at that moment, the write is handed here instead of being
lost. The thread retries each write (with a fresh connection) every RETRY_DELAY seconds until it succeeds or
DEFERRED_WRITE_SECONDS pass. Every write handed here is conditional (`status = processing`, a hold still
`held`), so a retry that races a sweeper or reconcile settles once. A process killed with writes still
pending leaves them to the sweeper (`conversations.sweeper`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from django.conf import settings
from django.db import Error as DatabaseError
from django.db import connection

logger = logging.getLogger(__name__)

RETRY_DELAY = 0.5


@dataclass
class _Write:
    key: str
    fn: Callable[[], object]
    deadline: float
    attempts: int = 0


_pending: deque[_Write] = deque()
_keys: set[str] = set()
_lock = threading.Condition()
_thread: threading.Thread | None = None


def close_broken_connection() -> None:
    """After a database error outside a transaction: drop this thread's connection, so the next use reconnects."""
    if not connection.in_atomic_block:
        try:
            connection.close()
        except Exception:  # noqa: BLE001 - the connection is gone already
            logger.debug("closing a broken connection failed", exc_info=True)


def run_or_defer(key: str, fn: Callable[[], object]) -> bool:
    """Runs `fn` now; on a database error hands it to the retry thread. True when it ran now."""
    try:
        fn()
        return True
    except DatabaseError as exc:
        close_broken_connection()
        logger.warning("%s failed (%s); retrying in the background", key, exc.__class__.__name__)
        defer(key, fn)
        return False


def defer(key: str, fn: Callable[[], object]) -> None:
    global _thread
    write = _Write(key, fn, time.monotonic() + settings.DEFERRED_WRITE_SECONDS)
    with _lock:
        _pending.append(write)
        _keys.add(key)
        if _thread is None or not _thread.is_alive():
            _thread = threading.Thread(target=_run, name="deferred-writes", daemon=True)
            _thread.start()
        _lock.notify()


def is_pending(key: str) -> bool:
    return key in _keys


def pending_count() -> int:
    return len(_pending)


def _run() -> None:
    while True:
        with _lock:
            while not _pending:
                _lock.wait()
            write = _pending.popleft()
        try:
            write.fn()
        except DatabaseError as exc:
            close_broken_connection()
            write.attempts += 1
            if time.monotonic() < write.deadline:
                with _lock:
                    _pending.append(write)
                time.sleep(RETRY_DELAY)
                continue
            logger.error("%s: gave up after %s attempts (%s); the sweeper and reconcile take over", write.key,
                         write.attempts, exc)
        except Exception:  # noqa: BLE001 - a bug in one write must not stop the others
            logger.exception("%s failed", write.key)
        with _lock:
            if not any(w.key == write.key for w in _pending):
                _keys.discard(write.key)
