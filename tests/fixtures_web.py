"""Fixtures for the web tests (loaded from tests/conftest.py).

`operator` / `operator_client`: a superuser and a Django test client logged in as them.
`browser_page`: a Playwright page in Debian's chromium (skipped with a reason when either is missing);
a failing test leaves a screenshot in test-artifacts/. Use it with `live_server_daphne`.
"""

from __future__ import annotations

import os
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
# Each browser action waits at most this long (ms), so a broken page fails fast instead of hanging.
BROWSER_TIMEOUT_MS = 10_000


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


@pytest.fixture
def browser_page(request, monkeypatch):
    """A Playwright page in a fresh chromium; on failure a full-page screenshot goes to test-artifacts/<test>.png.

    Function-scoped on purpose: Playwright's sync API marks an event loop as running in this thread while it
    is started, which Django's ORM refuses outside DJANGO_ALLOW_ASYNC_UNSAFE; stopping it after each test
    keeps the rest of the suite unaffected.
    """
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"browser tests need Debian's chromium at {CHROMIUM} (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("browser tests need the playwright package (pip install -r requirements.txt)")
    # The test's own ORM calls stay synchronous while Playwright's loop is marked running.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    manager = sync_playwright().start()
    try:
        browser = manager.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=30_000)
    except Exception as exc:  # noqa: BLE001 - a browser that can't start is an environment problem: skip
        manager.stop()
        pytest.skip(f"chromium did not start: {exc}")
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    context.set_default_timeout(BROWSER_TIMEOUT_MS)
    page = context.new_page()
    page.console_messages = []
    page.on("console", lambda msg: page.console_messages.append(f"{msg.type}: {msg.text}"))
    page.on("pageerror", lambda exc: page.console_messages.append(f"pageerror: {exc}"))
    try:
        yield page
    finally:
        report = getattr(request.node, "_report_call", None)
        if report is not None and report.failed:
            save_screenshot(page, request.node.nodeid)
        context.close()
        browser.close()
        manager.stop()


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
