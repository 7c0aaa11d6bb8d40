"""Fixtures for the web tests (loaded from tests/conftest.py).

`operator` / `operator_client`: a superuser and a Django test client logged in as them.
`web_server`: a live daphne (one per test module) against the test database, for the browser tests.
`debug_log`: every log record at DEBUG, SQL included, as production formats it (a StringIO), to search for secrets.
`browser_page`: a Playwright page in Debian's chromium (skipped with a reason when either is missing);
a failing test leaves a screenshot in test-artifacts/. Use it with `web_server`.
"""

from __future__ import annotations

import io
import logging
import os
import re
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from html.parser import HTMLParser
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection

from aiwriter.logging import JsonFormatter, RequestIdFilter

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
# Each browser action waits at most this long (ms): generous for a loaded 2-core machine, yet a broken page
# fails within the test's own timeout instead of hanging. Tests wait for conditions, never for fixed times.
BROWSER_TIMEOUT_MS = 20_000


@pytest.fixture
def operator(db):
    from tests.factories import make_user

    return make_user("operator", staff=True, is_superuser=True)


@pytest.fixture
def operator_client(operator, client):
    client.force_login(operator)
    return client


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"_report_{report.when}", report)


@pytest.fixture(scope="module")
def web_server_env() -> dict[str, str]:
    """Extra environment for the module's daphne (see `web_server`); override it, module-scoped, in a test module."""
    return {}


@pytest.fixture(scope="module")
def _module_daphne(request, django_db_setup, web_server_env):
    """One daphne per test module: starting one takes seconds on a loaded machine, a test module needs only one.

    The process keeps no state between tests that matters: the database is flushed and Redis emptied per test,
    and its in-process route and response caches are switched off so nothing from the last test is served.
    """
    if not settings.IS_POSTGRES:
        pytest.skip("the browser tests need PostgreSQL (DATABASE_URL)")
    env = {"LLM_ROUTE_CACHE_SECONDS": "0", "LLM_CACHE_MEMORY_ENTRIES": "0", **web_server_env}
    failures_before = request.session.testsfailed
    server_log = ARTIFACTS / (re.sub(r"[^\w.-]+", "_", request.node.name) + ".daphne.log")
    with run_daphne(env, log_to=server_log) as base_url:
        yield base_url
    if request.session.testsfailed == failures_before:
        server_log.unlink(missing_ok=True)  # kept only next to a failed test's screenshot


@pytest.fixture
def web_server(_module_daphne, transactional_db) -> str:
    """The base URL of a live daphne (the test upstream and the test database behind it) for a browser test."""
    return _module_daphne


@contextmanager
def run_daphne(extra_env: dict[str, str], log_to: Path | None = None) -> Iterator[str]:
    """Serves aiwriter.asgi with daphne on a free loopback port against the test database; yields the base URL.

    With `log_to`, the server's output is kept there (for a failed test's artifacts).
    """
    from tests.fixtures_chat import _database_url, _wait_until_healthy

    # Bind here and hand the listening socket to daphne (--fd): no race for the port.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.set_inheritable(True)
    port = sock.getsockname()[1]
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "DATABASE_URL": _database_url(),
           "REDIS_URL": settings.REDIS_URL, "REDIS_KEY_PREFIX": settings.REDIS_KEY_PREFIX, "DEBUG": "0",
           **extra_env}
    env.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)  # the server runs as in production
    log = tempfile.TemporaryFile()
    process = subprocess.Popen(
        [sys.executable, "-m", "aiwriter.serve", "--fd", str(sock.fileno()), "aiwriter.asgi:application"],
        cwd=str(settings.BASE_DIR), env=env, pass_fds=[sock.fileno()], stdout=log, stderr=subprocess.STDOUT,
    )
    sock.close()
    base_url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_healthy(base_url, process, log)
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
        if log_to is not None:
            log.seek(0)
            log_to.parent.mkdir(exist_ok=True)
            log_to.write_bytes(log.read())
        log.close()


def _missing(reason: str) -> None:
    """Skip on a bare machine; in CI (CI_REQUIRE_SERVICES=1) a missing browser fails instead of passing quietly."""
    if os.environ.get("CI_REQUIRE_SERVICES") == "1":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def _chromium():
    """Debian's chromium, launched once per test module (each test gets a fresh context: no shared cookies).

    Module-scoped, not session-scoped: Playwright's sync API marks an event loop as running in this thread
    while it is started, which Django's ORM refuses outside DJANGO_ALLOW_ASYNC_UNSAFE; so that variable is
    set only while a browser test module runs, and the rest of the suite is unaffected.
    """
    if not os.path.exists(CHROMIUM):
        _missing(f"browser tests need Debian's chromium at {CHROMIUM} (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("browser tests need the playwright package (pip install -r requirements.txt)")
    with pytest.MonkeyPatch.context() as patch:
        # The tests' own ORM calls stay synchronous while Playwright's loop is marked running.
        patch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
        manager = sync_playwright().start()
        try:
            try:
                browser = manager.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60_000)
            except Exception as exc:  # noqa: BLE001 - a browser that can't start is an environment problem: skip
                _missing(f"chromium did not start: {exc}")
            try:
                yield browser
            finally:
                browser.close()
        finally:
            manager.stop()


@pytest.fixture
def browser_page(request, _chromium, transactional_db):
    """A Playwright page in a fresh browser context; on failure a full-page screenshot goes to test-artifacts/.

    It asks for `transactional_db` so the page is closed (its sockets too) before the database is flushed.
    Requests to anywhere but the loopback server are refused and listed in `page.external_requests`:
    the pages must work with no internet (no CDN).
    """
    context = _chromium.new_context(viewport={"width": 1280, "height": 860})
    context.set_default_timeout(BROWSER_TIMEOUT_MS)
    context.set_default_navigation_timeout(BROWSER_TIMEOUT_MS)
    page = context.new_page()
    page.console_messages = []
    page.external_requests = []
    page.on("console", lambda msg: page.console_messages.append(f"{msg.type}: {msg.text}"))
    page.on("pageerror", lambda exc: page.console_messages.append(f"pageerror: {exc}"))

    def offline(route):
        page.external_requests.append(route.request.url)
        route.abort()

    context.route(re.compile(r"^(?!(https?|wss?)://(127\.0\.0\.1|localhost)[:/])(?!data:|blob:|about:)"), offline)
    try:
        yield page
    finally:
        report = getattr(request.node, "_report_call", None)
        if report is not None and report.failed:
            save_screenshot(page, request.node.nodeid)
        context.close()


def save_screenshot(page, name: str) -> Path | None:
    """Saves the page as test-artifacts/<name>.png (and its console as .console.txt)."""
    ARTIFACTS.mkdir(exist_ok=True)
    stem = re.sub(r"[^\w.-]+", "_", name)[-150:]
    try:
        page.screenshot(path=str(ARTIFACTS / f"{stem}.png"), full_page=True, timeout=5_000)
        (ARTIFACTS / f"{stem}.console.txt").write_text("\n".join(page.console_messages))
    except Exception:  # noqa: BLE001 - a screenshot is a courtesy; the test already failed
        return None
    return ARTIFACTS / f"{stem}.png"


def browser_login(page, base_url: str, username: str, password: str = "pw-123456", next_path: str = "/") -> None:
    """Logs in through the real login form."""
    page.goto(f"{base_url}/accounts/login/?next={next_path}")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(re.escape(base_url + next_path) + r"(\?.*)?$"))


def admin_login(page, base_url: str, username: str, password: str = "pw-123456") -> None:
    page.goto(f"{base_url}/admin/login/?next=/admin/")
    page.fill("#id_username", username)
    page.fill("#id_password", password)
    page.click("input[type=submit]")
    page.wait_for_url(f"{base_url}/admin/")


class _FormParser(HTMLParser):
    """Collects what a browser would submit for one form (by id), for test-client tests of admin forms."""

    def __init__(self, form_id: str):
        super().__init__(convert_charrefs=True)
        self.form_id = form_id
        self.inside = False
        self.data: dict[str, list[str]] = {}
        self._select: str | None = None
        self._first: str | None = None
        self._chosen: str | None = None
        self._textarea: str | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "form" and a.get("id") == self.form_id:
            self.inside = True
        if not self.inside:
            return
        name = a.get("name")
        if tag == "input" and name:
            kind = (a.get("type") or "text").lower()
            if kind in ("submit", "button", "image", "file", "reset"):
                return
            if kind in ("checkbox", "radio") and "checked" not in a:
                return
            self.data.setdefault(name, []).append(a.get("value") or ("on" if kind == "checkbox" else ""))
        elif tag == "select" and name:
            self._select, self._first, self._chosen = name, None, None
        elif tag == "option" and self._select is not None:
            if self._first is None:
                self._first = a.get("value", "")
            if "selected" in a:
                self._chosen = a.get("value", "")
        elif tag == "textarea" and name:
            self._textarea, self._text = name, []

    def handle_data(self, data):
        if self._textarea is not None:
            self._text.append(data)

    def handle_endtag(self, tag):
        if tag == "form":
            self.inside = False
        elif tag == "select" and self._select is not None:
            value = self._chosen if self._chosen is not None else (self._first or "")
            self.data.setdefault(self._select, []).append(value)
            self._select = None
        elif tag == "textarea" and self._textarea is not None:
            self.data.setdefault(self._textarea, []).append("".join(self._text).removeprefix("\n"))
            self._textarea = None


def form_data(html: str | bytes, form_id: str) -> dict[str, str | list[str]]:
    """The name → value(s) a browser would post for the form with this id (without a submit button)."""
    parser = _FormParser(form_id)
    parser.feed(html.decode() if isinstance(html, bytes) else html)
    return {k: v[0] if len(v) == 1 else v for k, v in parser.data.items()}


@pytest.fixture
def debug_log():
    """Every record at DEBUG from every logger, formatted as production formats them, plus SQL statements."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setLevel(logging.DEBUG)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    quiet = {name: logging.getLogger(name).level for name in ("django.server", "daphne", "django.db.backends")}
    for name in quiet:
        logging.getLogger(name).setLevel(logging.DEBUG)
    connection.force_debug_cursor = True
    yield stream
    connection.force_debug_cursor = False
    root.removeHandler(handler)
    root.setLevel(old_level)
    for name, level in quiet.items():
        logging.getLogger(name).setLevel(level)
