"""Fixtures for the fault, multi-process and load tests (loaded from tests/conftest.py).

`own_redis`: a redis-server of the test's own on a free loopback port, which the test may stop and start
again on the same port (`.stop()`, `.start()`); `.url(db)` gives its URL.

`daphne_processes`: starts real daphne processes against the test database (`start(**env)` → DaphneProcess
with `.base_url`, `.ws_url`, `.kill()`); every process is stopped at teardown. Needs PostgreSQL.

`DatabaseLink(host, port)`: a TCP proxy to PostgreSQL that the test can cut (`.cut()`: open connections reset,
new ones refused) and `.restore()`; `database_url_through(link)` is the test database's URL through it.

`assert_settled()`: the end-state invariants every request must leave behind — no reply in `processing`,
no credit hold still held, nothing reserved on any account, no conversation locked, ledger = balance.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import quote

import pytest
from django.conf import settings

from tests.fixtures_chat import _database_url, _wait_until_healthy


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """`redis-server --port N --save "" --appendonly no` as a child process (nothing persisted: a restart is empty)."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> RedisServer:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--daemonize", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self.process = None


@pytest.fixture
def own_redis():
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = RedisServer().start()
    yield server
    server.stop()
    _forget_redis_clients()  # the next test gets clients for its own REDIS_URL


def _forget_redis_clients() -> None:
    from aiwriter import redis as shared_redis
    from aiwriter import redis_guard

    shared_redis.get_redis.cache_clear()
    shared_redis._async_clients.clear()
    redis_guard.reset()


def use_redis(settings_fixture, url: str) -> None:
    """Points this process's locks, sequences, limits, cache and channel layer at `url` (pytest-django `settings`)."""
    settings_fixture.REDIS_URL = url
    settings_fixture.CACHES = {"default": {
        "BACKEND": "django_redis.cache.RedisCache", "LOCATION": url, "KEY_PREFIX": settings.REDIS_KEY_PREFIX,
        "OPTIONS": {"CLIENT_CLASS": "django_redis.client.DefaultClient", "IGNORE_EXCEPTIONS": True,
                    "SOCKET_CONNECT_TIMEOUT": 1, "SOCKET_TIMEOUT": 1}}}
    _forget_redis_clients()


@dataclass
class DaphneProcess:
    process: subprocess.Popen
    base_url: str
    log: object = field(repr=False)

    @property
    def ws_url(self) -> str:
        return self.base_url.replace("http://", "ws://", 1) + "/ws/chat/"

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind, as when a worker's machine dies."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")


def start_daphne(daphne_args: tuple[str, ...] = (), **env: str) -> DaphneProcess:
    """One daphne process on a free loopback port, against the test database and (unless overridden) Redis."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(512)
    sock.set_inheritable(True)
    port = sock.getsockname()[1]
    full_env = {
        **os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "DATABASE_URL": _database_url(),
        "REDIS_URL": settings.REDIS_URL, "REDIS_KEY_PREFIX": settings.REDIS_KEY_PREFIX, "DEBUG": "0",
        "LOG_LEVEL": "WARNING", **env,
    }
    log = tempfile.TemporaryFile()
    process = subprocess.Popen(
        [sys.executable, "-m", "aiwriter.serve", "--fd", str(sock.fileno()), *daphne_args, "aiwriter.asgi:application"],
        cwd=str(settings.BASE_DIR), env=full_env, pass_fds=[sock.fileno()], stdout=log, stderr=subprocess.STDOUT)
    sock.close()
    base_url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_healthy(base_url, process, log)
    except BaseException:
        process.kill()
        process.wait(timeout=5)
        raise
    return DaphneProcess(process, base_url, log)


@pytest.fixture
def daphne_processes(transactional_db):
    """`start(daphne_args=(), **env)` → a running DaphneProcess; all are stopped when the test ends."""
    if not settings.IS_POSTGRES:
        pytest.skip("daphne processes need PostgreSQL (DATABASE_URL)")
    started: list[DaphneProcess] = []

    def start(daphne_args: tuple[str, ...] = (), **env: str) -> DaphneProcess:
        started.append(start_daphne(daphne_args, **env))
        return started[-1]

    yield start
    for daphne in started:
        daphne.stop()
        daphne.log.close()


def unsettled() -> dict[str, list]:
    """What is left unfinished: replies in processing, holds still held, reserved credit, live leases."""
    from conversations.models import GenerationLease, Message
    from tests.fixtures_usage import ledger_mismatches
    from usage.models import CreditAccount, Reservation

    return {
        "processing": list(Message.objects.filter(status__in=[Message.Status.PROCESSING, Message.Status.PENDING])
                           .values_list("pk", "role", "status")),
        "held": list(Reservation.objects.filter(status=Reservation.Status.HELD).values_list("pk", "amount")),
        "reserved": list(CreditAccount.objects.exclude(reserved=0).values_list("pk", "reserved")),
        "negative": list(CreditAccount.objects.filter(balance__lt=0).values_list("pk", "balance")),
        "leases": list(GenerationLease.objects.values_list("conversation_id", flat=True)),
        "ledger": ledger_mismatches(),
    }


def conversations_locked(owner_ids=None) -> list[int]:
    from conversations import locks
    from conversations.models import Conversation

    qs = Conversation.objects.all()
    if owner_ids is not None:
        qs = qs.filter(owner_id__in=owner_ids)
    return [c.pk for c in qs if locks.is_locked(c.pk, c.owner_id)]


@pytest.fixture
def assert_settled():
    def check(*, wait: float = 10.0) -> None:
        deadline = time.monotonic() + wait
        while True:
            left = {k: v for k, v in unsettled().items() if v}
            locked = conversations_locked()
            if not left and not locked:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"unsettled after the requests ended: {left}, locked conversations {locked}")
            time.sleep(0.1)

    return check


class DatabaseLink:
    """A TCP proxy to PostgreSQL that can be cut (open connections reset, new ones refused) and restored."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.up = True
        self.open: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            upstream = socket.create_connection(self.target)
            with self.lock:
                self.open += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> int:
        self.up = False
        with self.lock:
            dropped, self.open = self.open, []
        for sock in dropped:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return len(dropped) // 2

    def restore(self) -> None:
        self.up = True

    def close(self) -> None:
        self.listener.close()
        self.cut()


def database_url_through(link: DatabaseLink) -> str:
    """The test database's URL through `link`, for a daphne process."""
    from django.db import connection

    db = connection.settings_dict
    return f"postgres://{quote(db['USER'] or '', safe='')}@127.0.0.1:{link.port}/{db['NAME']}"
