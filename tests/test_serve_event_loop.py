"""`python -m aiwriter.serve` is daphne on uvloop's event loop, or on asyncio's own when told; either serves and stops.

The live-server tests (chat over websockets, faults, /v1 through the SDK, the browser) all start the server this
way, so they run on the loop production gets."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from django.conf import settings

from tests.fixtures_faults import free_port


def _serve(env_extra: dict[str, str]) -> tuple[str, str]:
    """Starts the launcher, fetches /healthz, stops it with SIGTERM; (the loop it named, the /healthz body)."""
    port = free_port()
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "DEBUG": "0", **env_extra}
    server = subprocess.Popen([sys.executable, "-m", "aiwriter.serve", "-b", "127.0.0.1", "-p", str(port),
                               "aiwriter.asgi:application"], cwd=settings.BASE_DIR, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).read().decode()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.1)
        server.send_signal(signal.SIGTERM)
        out, _ = server.communicate(timeout=10)  # a clean stop, not the kill below
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(5)
    first_line = out.splitlines()[0]
    assert first_line.startswith("aiwriter: daphne on "), out[:500]
    return first_line.removeprefix("aiwriter: daphne on "), body


def test_serves_on_uvloop_by_default():
    pytest.importorskip("uvloop")
    loop, body = _serve({})
    assert loop == "uvloop.Loop"
    assert body == '{"status": "ok"}'


def test_serves_on_asyncios_loop_when_told():
    loop, body = _serve({"SERVER_EVENT_LOOP": "asyncio"})
    assert loop.startswith("asyncio.") and "uvloop" not in loop
    assert body == '{"status": "ok"}'
