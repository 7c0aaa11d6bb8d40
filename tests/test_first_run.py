"""The README's first command, as a newcomer runs it on a bare machine: migrate and seed (twice, as running
`make run` again does), then daphne serving the admin and the demo agent over the websocket.

Subprocesses with no DATABASE_URL or REDIS_URL: SQLite, the local-memory cache, the in-memory channel layer
and the demo provider, in a temporary directory (database file and seed state).
"""

from __future__ import annotations

import asyncio
import http.cookiejar
import json
import os
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from decimal import Decimal

import pytest
import websockets
from django.conf import settings

from tests.fixtures_faults import free_port

pytestmark = pytest.mark.timeout(180)


def _env(tmp_path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "REDIS_URL", "DJANGO_SETTINGS_MODULE", "SECRET_KEY", "ADMIN_PASSWORD",
                         "DEMO_PASSWORD", "OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_MODELS")}
    return {**env, "DEBUG": "1", "SQLITE_PATH": str(tmp_path / "db.sqlite3"), "STATE_DIR": str(tmp_path / "var"),
            "PORT": str(port), "DEMO_CHUNK_DELAY_SECONDS": "0.001"}


def _manage(env: dict[str, str], *args: str) -> str:
    result = subprocess.run([sys.executable, "manage.py", *args], cwd=settings.BASE_DIR, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _seed_output(out: str) -> dict[str, str]:
    login = re.search(r"Operator:\s+(\S+) / (\S+)", out)
    key = re.search(r"API key:\s+(\S+)", out)
    assert login and key and "/admin/" in out, out
    return {"username": login[1], "password": login[2], "key": key[1]}


def _admin_login(base: str, username: str, password: str) -> str:
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    page = opener.open(f"{base}/admin/login/?next=/admin/", timeout=10).read().decode()
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page)[1]
    form = urllib.parse.urlencode({"username": username, "password": password, "csrfmiddlewaretoken": token,
                                   "next": "/admin/"}).encode()
    request = urllib.request.Request(f"{base}/admin/login/?next=/admin/", data=form,
                                     headers={"Referer": f"{base}/admin/login/"})
    return opener.open(request, timeout=10).read().decode()


async def _chat_with_the_demo_agent(ws_url: str, origin: str, key: str) -> list[dict]:
    headers = {"Origin": origin, "Authorization": f"Bearer {key}"}
    async with websockets.connect(ws_url, additional_headers=headers, open_timeout=10) as socket:
        await socket.send(json.dumps({"type": "message", "conversation": None, "agent": "demo",
                                      "content": "Write one line about spring"}))
        frames: list[dict] = []
        async with asyncio.timeout(30):
            while not frames or frames[-1]["type"] not in ("done", "error"):
                frames.append(json.loads(await socket.recv()))
        return frames


def test_first_command_twice_then_admin_and_demo_chat(tmp_path):
    port = free_port()
    env = _env(tmp_path, port)
    _manage(env, "migrate", "--noinput")
    first = _seed_output(_manage(env, "seed_demo"))
    assert "No migrations to apply" in _manage(env, "migrate", "--noinput")  # the second run is a no-op
    assert _seed_output(_manage(env, "seed_demo")) == first  # same admin login and demo key

    server = subprocess.Popen([sys.executable, "-m", "aiwriter.serve", "-b", "127.0.0.1", "-p", str(port),
                               "aiwriter.asgi:application"], cwd=settings.BASE_DIR, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if urllib.request.urlopen(f"{base}/readyz", timeout=2).status == 200:
                    break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "daphne did not come up"
                time.sleep(0.2)

        dashboard = _admin_login(base, first["username"], first["password"])
        assert "Site administration" in dashboard or "Log out" in dashboard, dashboard[:500]

        frames = asyncio.run(_chat_with_the_demo_agent(base.replace("http", "ws", 1) + "/ws/chat/", base,
                                                       first["key"]))
        kinds = [frame["type"] for frame in frames]
        assert kinds[-1] == "done", frames
        assert "delta" in kinds and {"thinking", "generating"} <= {f.get("status") for f in frames}
        reply = "".join(frame["content"] for frame in frames if frame["type"] == "delta")
        assert "spring" in reply and frames[-1]["usage"]["completion_tokens"] > 0
        assert Decimal(frames[-1]["cost"]) == 0  # the demo provider costs nothing
    finally:
        server.terminate()
        server.wait(timeout=10)
