import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from aiwriter.logging import JsonFormatter, RequestIdFilter

ROOT = Path(__file__).resolve().parent.parent


def _manage(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in {"DJANGO_SETTINGS_MODULE", "SECRET_KEY", "DEBUG"}}
    return subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env={**base, **env},
                          capture_output=True, text=True, timeout=60)


def test_secret_key_required_when_debug_off():
    result = _manage("check", env={"DEBUG": "0"})
    assert result.returncode != 0
    assert "SECRET_KEY must be set" in result.stderr


def test_check_deploy_is_clean_under_production_settings():
    result = _manage("check", "--deploy", "--fail-level", "WARNING", env={
        "SECRET_KEY": "x" * 20 + "production-like-secret-key-with-enough-entropy-0123456789",
        "SECURE_SSL_REDIRECT": "1", "SECURE_HSTS_SECONDS": "31536000", "SECURE_HSTS_INCLUDE_SUBDOMAINS": "1",
        "SECURE_HSTS_PRELOAD": "1", "ALLOWED_HOSTS": "aiwriter.example.com",
        # Only parsed by `check`: nothing connects.
        "DATABASE_URL": "postgres://aiw:pw@127.0.0.1:5432/aiwriter", "REDIS_URL": "redis://127.0.0.1:6379/0",
    })
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_check_deploy_warns_that_embedded_mode_serves_one_process():
    production = {"SECRET_KEY": "x" * 20 + "production-like-secret-key-with-enough-entropy-0123456789",
                  "SECURE_SSL_REDIRECT": "1", "SECURE_HSTS_SECONDS": "31536000", "SECURE_HSTS_INCLUDE_SUBDOMAINS": "1",
                  "SECURE_HSTS_PRELOAD": "1", "ALLOWED_HOSTS": "aiwriter.example.com", "DEBUG": "0"}
    embedded = _manage("check", "--deploy", env={**production, "DATABASE_URL": "", "REDIS_URL": ""})
    assert "aiwriter.W002" in embedded.stderr + embedded.stdout and "SQLite" in embedded.stderr + embedded.stdout
    assert "aiwriter.W003" in embedded.stderr + embedded.stdout
    half = _manage("check", "--deploy", env={**production, "DATABASE_URL": "postgres://a:b@127.0.0.1:5432/c",
                                             "REDIS_URL": ""})
    assert "aiwriter.W002" not in half.stderr + half.stdout and "aiwriter.W003" in half.stderr + half.stdout
    dev = _manage("check", "--deploy", env={**production, "DEBUG": "1", "DATABASE_URL": "", "REDIS_URL": ""})
    assert "aiwriter.W00" not in dev.stderr + dev.stdout  # `make run` on a laptop: embedded is the point


@pytest.mark.django_db
def test_json_log_lines_carry_the_request_id(client):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("django.request")
    logger.addHandler(handler)
    try:
        client.get("/api/does-not-exist/", HTTP_X_REQUEST_ID="req-42")
    finally:
        logger.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert lines, "a 404 is logged by django.request"
    assert all(line["request_id"] == "req-42" for line in lines)
    assert {"ts", "level", "logger", "message"} <= set(lines[0])


LOGGING_SCRIPT = """
import logging
from django.test import Client

log = logging.getLogger("aiwriter.logcheck")
log.warning("a message\\nover two lines")
try:
    1 / 0
except ZeroDivisionError:
    log.exception("with a traceback")
Client().get("/api/does-not-exist/", HTTP_X_REQUEST_ID="req-json-7")
"""


def test_log_format_json_writes_one_json_object_per_line():
    """The real settings with LOG_FORMAT=json: every line the process writes to stderr is one JSON object, even
    for a multi-line message and a traceback, and a request's line carries its request id."""
    result = _manage("shell", "-c", LOGGING_SCRIPT, env={
        "LOG_FORMAT": "json", "SECRET_KEY": "x" * 50, "DATABASE_URL": "", "REDIS_URL": "", "SQLITE_PATH": ":memory:",
    })
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    records = [json.loads(line) for line in lines]  # a line that is not JSON fails here
    assert all(isinstance(r, dict) and {"ts", "level", "logger", "message", "request_id"} <= set(r) for r in records)
    by_message = {r["message"]: r for r in records}
    assert by_message["a message\nover two lines"]["level"] == "WARNING"
    assert "ZeroDivisionError" in by_message["with a traceback"]["exc"]
    request_lines = [r for r in records if r["logger"] == "django.request"]
    assert request_lines and all(r["request_id"] == "req-json-7" for r in request_lines)
    assert request_lines[0]["message"] == "Not Found: /api/does-not-exist/"
