"""Circuit breakers shared by processes (issue 14): a deployment opened in one process is open in another and in a
restarted one, and closes for all after a trial succeeds; with Redis down each process keeps its own, as before."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest
import redis
from django.conf import settings

from agents.llm import breaker
from aiwriter import redis_guard
from aiwriter.redis import key as redis_key
from tests.fixtures_faults import use_redis

pytestmark = pytest.mark.redis

RECOVERY = 1.5  # long enough that a loaded machine answers within it

# The other process: a Python with Django set up, driving its breakers from lines on stdin ("fail 7", "succeed 7",
# "state 7", "refresh"), answering each with the deployment's state.
OTHER = textwrap.dedent(f"""
    import sys, django
    django.setup()
    from agents.llm import breaker
    for line in sys.stdin:
        verb, arg = (line.split() + [""])[:2]
        if verb == "refresh":
            breaker.refresh()
            print("ok", flush=True)
            continue
        b = breaker.get(int(arg), threshold=2, recovery={RECOVERY})
        if verb == "fail":
            b.failure()
        elif verb == "succeed":
            assert b.allow()
            b.success()
        print(breaker.state_of(int(arg)), flush=True)
""")


class OtherProcess:
    def __init__(self) -> None:
        env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "REDIS_URL": settings.REDIS_URL,
               "REDIS_KEY_PREFIX": settings.REDIS_KEY_PREFIX}
        self.process = subprocess.Popen([sys.executable, "-c", OTHER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True, env=env, cwd=settings.BASE_DIR)

    def ask(self, line: str) -> str:
        assert self.process.stdin and self.process.stdout
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()
        return self.process.stdout.readline().strip()

    def close(self) -> None:
        if self.process.stdin:
            self.process.stdin.close()
        self.process.wait(timeout=30)


@pytest.fixture
def other() -> Iterator[OtherProcess]:
    process = OtherProcess()
    assert process.ask("refresh") == "ok"  # started and set up
    yield process
    process.close()


def _breaker(deployment_id: int) -> breaker.CircuitBreaker:
    return breaker.get(deployment_id, threshold=2, recovery=RECOVERY)


def test_a_breaker_opened_here_is_still_open_after_a_restart():
    circuit = _breaker(11)
    circuit.failure()
    circuit.failure()
    assert breaker.state_of(11) == breaker.OPEN
    breaker.reset()  # what a restart forgets
    assert breaker.state_of(11) == breaker.OPEN
    assert not _breaker(11).available() and not _breaker(11).allow()
    assert breaker.state_of(12) == breaker.CLOSED


def test_open_in_another_process_is_open_here_and_a_trial_closes_it_for_both(other):
    assert other.ask("fail 21") == breaker.CLOSED  # one failure of two: still closed, here too
    breaker.refresh()
    assert breaker.state_of(21) == breaker.CLOSED and _breaker(21).failures == 0  # failures below N are per process
    assert other.ask("fail 21") == breaker.OPEN
    breaker.refresh()
    assert breaker.state_of(21) == breaker.OPEN and not _breaker(21).available()

    time.sleep(RECOVERY + 0.1)
    assert breaker.state_of(21) == breaker.HALF_OPEN and other.ask("state 21") == breaker.HALF_OPEN
    circuit = _breaker(21)
    assert circuit.allow()  # this process's trial
    circuit.success()
    assert breaker.state_of(21) == breaker.CLOSED
    assert other.ask("refresh") == "ok" and other.ask("state 21") == breaker.CLOSED


def test_open_here_is_open_in_another_process(other):
    circuit = _breaker(31)
    circuit.failure()
    circuit.failure()
    assert other.ask("refresh") == "ok"  # its next read of the store (at most a second away)
    assert other.ask("state 31") == breaker.OPEN
    time.sleep(RECOVERY + 0.1)
    assert other.ask("succeed 31") == breaker.CLOSED  # the other process's trial succeeds
    breaker.refresh()
    assert breaker.state_of(31) == breaker.CLOSED and _breaker(31).allow()


def test_a_failed_trial_elsewhere_reopens_here_for_a_full_pause(other):
    for _ in range(2):
        other.ask("fail 41")
    time.sleep(RECOVERY + 0.1)
    breaker.refresh()
    assert breaker.state_of(41) == breaker.HALF_OPEN
    assert other.ask("fail 41") == breaker.OPEN  # its trial failed
    breaker.refresh()
    assert breaker.state_of(41) == breaker.OPEN


async def test_the_event_loop_sees_another_process_within_the_refresh_interval(other):
    assert _breaker(51).available()  # the first read after a start: nothing is open
    for _ in range(2):
        other.ask("fail 51")
    deadline = time.monotonic() + breaker.REFRESH_SECONDS + 5
    while _breaker(51).available():  # the view is read in the background, never awaited by a call
        assert time.monotonic() < deadline, "the open breaker of the other process was never seen"
        await asyncio.sleep(0.05)
    assert breaker.state_of(51) == breaker.OPEN


def test_redis_down_leaves_each_process_its_own_breakers(own_redis, settings, monkeypatch):
    monkeypatch.setattr(redis_guard, "PAUSE_SECONDS", 0.2)
    use_redis(settings, own_redis.url(0))
    breaker.reset()
    own_redis.stop()
    circuit = _breaker(61)
    circuit.failure()
    circuit.failure()  # the publish fails: the breaker opens here all the same
    assert breaker.state_of(61) == breaker.OPEN and not circuit.available()
    breaker.reset()
    assert breaker.state_of(61) == breaker.CLOSED  # nothing was shared: a restart starts closed, as before

    circuit = _breaker(62)
    circuit.failure()
    circuit.failure()
    own_redis.start()  # Redis is back (and empty): the pause opened meanwhile is published with the next read
    time.sleep(0.25)
    breaker.refresh()
    assert breaker.state_of(62) == breaker.OPEN  # merging the first view re-publishes the pause
    raw = redis.Redis.from_url(own_redis.url(0))
    assert raw.hexists(redis_key("llm", "breakers"), "62")
    breaker.reset()
    assert breaker.state_of(62) == breaker.OPEN


def test_without_redis_breakers_are_per_process(settings):
    settings.REDIS_URL = ""
    breaker.reset()
    circuit = _breaker(71)
    circuit.failure()
    circuit.failure()
    assert breaker.state_of(71) == breaker.OPEN
    breaker.reset()
    assert breaker.state_of(71) == breaker.CLOSED


def test_an_emptied_store_is_not_read_as_closed():
    circuit = _breaker(81)
    circuit.failure()
    circuit.failure()
    client = redis.Redis.from_url(settings.REDIS_URL)
    client.delete(redis_key("llm", "breakers"))  # Redis restarted empty, say
    breaker.refresh()
    assert breaker.state_of(81) == breaker.OPEN  # still open here, and written again for the others
    assert client.hget(redis_key("llm", "breakers"), "81").startswith(b"open:")
