"""The sweeper every server process runs by itself (no cron): dead generations free what they held within seconds.

Every SWEEPER_INTERVAL_SECONDS a daemon thread, started by the ASGI application on its first connection:
- ends replies still `processing` whose generation stopped heartbeating for CONVERSATION_LOCK_SECONDS (worker
  killed, server restarted, final write lost) as `error` with their text, and settles their holds — which frees
  the conversation and the user's concurrency slot (both count only live generations);
- charges holds whose call's outcome was saved on them (a record that could not be written), and releases holds
  with no outcome after an hour, as `reconcile_reservations` does.

Several processes sweeping at once settle each reply and hold once: every write is conditional (`status =
processing`, `status = held` under a row lock taken with SKIP LOCKED).
"""

from __future__ import annotations

import logging
import os
import threading
import time

from django.conf import settings
from django.db import Error as DatabaseError

from conversations.services import sweep_stuck_messages
from usage.billing.reconcile import reconcile_reservations

logger = logging.getLogger(__name__)

_started_in: int | None = None  # the pid that started it (a forked child starts its own)
_start_lock = threading.Lock()


def sweep_once() -> dict[str, int]:
    swept = sweep_stuck_messages(older_than_seconds=settings.CONVERSATION_LOCK_SECONDS, only_unlocked=True)
    reconciled = reconcile_reservations()
    return {"swept": swept, **reconciled}


def start() -> bool:
    """Starts this process's sweeper once (no-op when SWEEPER_INTERVAL_SECONDS is 0). True if it started now."""
    global _started_in
    interval = settings.SWEEPER_INTERVAL_SECONDS
    if interval <= 0 or _started_in == os.getpid():
        return False
    with _start_lock:
        if _started_in == os.getpid():
            return False
        _started_in = os.getpid()
    threading.Thread(target=_run, args=(interval,), name="sweeper", daemon=True).start()
    return True


def _run(interval: float) -> None:
    from aiwriter.deferred import close_broken_connection

    while True:
        time.sleep(interval)
        try:
            done = sweep_once()
            if any(done.values()):
                logger.info("sweeper: %s", done)
        except DatabaseError as exc:  # the database is away: try again next time
            logger.warning("sweeper: database unavailable (%s)", exc.__class__.__name__)
            close_broken_connection()
        except Exception:  # noqa: BLE001 - the sweeper must outlive a bug in one pass
            logger.exception("sweeper pass failed")
