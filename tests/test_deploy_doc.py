"""docs/deploy.md cannot rot: its shell blocks run, in order, in a fresh clone against a throw-away PostgreSQL
database and Redis; its systemd units pass `systemd-analyze verify` (a structural check without systemd); its nginx
site passes `nginx -t` when nginx is installed, else a structural check of what the guide promises."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
from django.conf import settings

ROOT = Path(settings.BASE_DIR)
DOC = (ROOT / "docs" / "deploy.md").read_text()
BLOCKS = re.findall(r"^```(\w+)([^\n]*)\n(.*?)\n```", DOC, re.S | re.M)


def _blocks(lang: str) -> list[tuple[str, str]]:
    return [(info.strip(), body) for kind, info, body in BLOCKS if kind == lang]


def test_every_block_is_tagged_for_a_check():
    """An untagged shell block would be a command nothing runs."""
    tags = {"sh": "deploy-run", "ini": "deploy-unit", "nginx": "deploy-nginx"}
    assert _blocks("sh") and _blocks("ini") and _blocks("nginx")
    for kind, info, _ in BLOCKS:
        if kind in tags:
            assert tags[kind] in info, f"```{kind} block without {tags[kind]}"
    assert {kind for kind, _, _ in BLOCKS} <= set(tags), "a block of a kind this test does not check"


def _units(tmp_path: Path) -> dict[str, str]:
    app = tmp_path / "app"
    app.mkdir()
    (app / "venv").symlink_to(Path(sys.prefix))  # an installed venv, for ExecStart
    units = {}
    for info, body in _blocks("ini"):
        found = re.search(r"name=(\S+)", info)
        assert found is not None, info
        name = found[1]
        units[name] = body.replace("/srv/aiwriter", str(app)) + "\n"
    return units


def test_systemd_units_verify(tmp_path):
    units = _units(tmp_path)
    assert {"aiwriter@.service", "aiwriter.target", "aiwriter-metrics-dir.service", "aiwriter-job@.service",
            "aiwriter-job@.timer"} <= set(units)
    for name, body in units.items():
        assert body.lstrip().startswith("[Unit]"), name
        if name.endswith(".service"):
            exec_lines = re.findall(r"^ExecStart=(\S+)", body, re.M)
            assert exec_lines and all(path.startswith("/") for path in exec_lines), name
    daphne = re.search(r"^ExecStart=(.*)$", units["aiwriter@.service"], re.M)[1]
    assert "--proxy-headers" not in daphne  # TRUSTED_PROXY_COUNT reads X-Forwarded-For; daphne must not rewrite it
    assert "EnvironmentFile=" in units["aiwriter@.service"] and "PartOf=aiwriter.target" in units["aiwriter@.service"]
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed: structure checked only")
    # Instances of the templates, as systemctl would make them.
    instances = {"aiwriter@8001.service": units["aiwriter@.service"],
                 "aiwriter-job@sweep_stuck_messages.service": units["aiwriter-job@.service"],
                 "aiwriter-job@sweep_stuck_messages.timer": units["aiwriter-job@.timer"],
                 "aiwriter-metrics-dir.service": units["aiwriter-metrics-dir.service"],
                 "aiwriter.target": units["aiwriter.target"]}
    paths = []
    for name, body in instances.items():
        (tmp_path / name).write_text(body)
        paths.append(str(tmp_path / name))
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", *paths], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Unknown key" not in output and "Unknown section" not in output, output


def test_nginx_site(tmp_path):
    [(_, site)] = _blocks("nginx")
    for promised in ("proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
                     "proxy_set_header X-Forwarded-Proto $scheme;", "proxy_set_header Upgrade $http_upgrade;",
                     "proxy_set_header Connection $connection_upgrade;", "proxy_buffering off;",
                     "proxy_http_version 1.1;"):
        assert promised in site, promised
    assert site.count("{") == site.count("}")
    for line in (raw.strip() for raw in site.splitlines()):
        assert not line or line.endswith(("{", "}", ";")), f"not a directive: {line!r}"
    ports = re.findall(r"server 127\.0\.0\.1:(\d+);", site)
    daphne_units = DOC.count("aiwriter@8001.service") and re.search(r"Wants=(.*)", DOC)[1]
    assert ports and all(f"aiwriter@{port}.service" in daphne_units for port in ports)  # the same N processes
    nginx = shutil.which("nginx")
    if nginx is None:
        pytest.skip("nginx is not installed: structure checked only")
    # Certificates the test makes itself; the rest exactly as in the guide.
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=ai.example.com",
                    "-keyout", str(key), "-out", str(cert), "-days", "1"], check=True, capture_output=True)
    site = re.sub(r"ssl_certificate\s+\S+;", f"ssl_certificate {cert};", site)
    site = re.sub(r"ssl_certificate_key\s+\S+;", f"ssl_certificate_key {key};", site)
    conf = tmp_path / "nginx.conf"
    conf.write_text(f"pid {tmp_path}/nginx.pid;\nerror_log stderr;\nevents {{}}\nhttp {{\n{site}\n}}\n")
    result = subprocess.run([nginx, "-t", "-c", str(conf), "-p", str(tmp_path)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr


@pytest.fixture
def throwaway_database():
    import psycopg

    url = urlsplit(os.environ["DATABASE_URL"])
    name = f"aiw_deploydoc_{os.getpid()}"
    admin_url = urlunsplit(url._replace(path="/postgres"))
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    yield urlunsplit(url._replace(path=f"/{name}"))
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.pg
@pytest.mark.redis
@pytest.mark.timeout(900)
def test_the_guides_commands_run(tmp_path, throwaway_database, fake_upstream):
    import psycopg

    script = "set -euo pipefail\n" + "\n".join(
        f"# --- block {n}\n( {body}\n)" for n, (info, body) in enumerate(_blocks("sh")) if "deploy-run" in info)
    (tmp_path / "backups").mkdir()
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "PIP_CERT", "PIP_FIND_LINKS", "PIP_DEFAULT_TIMEOUT",
            "PIP_DISABLE_PIP_VERSION_CHECK", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env.update({
        "REPO": str(ROOT), "APP": str(tmp_path / "aiwriter"), "BACKUP_DIR": str(tmp_path / "backups"),
        "SECRET_KEY": "deploy-doc-" + "k3y-with-enough-entropy-0123456789-abcdefghijklmnopqrstuvwxyz",
        "DATABASE_URL": throwaway_database, "REDIS_URL": settings.REDIS_URL,
        "METRICS_DIR": str(tmp_path / "metrics"), "OPERATOR_PASSWORD": "operator-pass-123",
        "OPENAI_BASE_URL": fake_upstream.base_url, "OPENAI_API_KEY": "sk-deploy-doc",
    })
    result = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=880,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "aiwriter.W00" not in result.stdout + result.stderr  # check --deploy silent with the guide's settings

    with psycopg.connect(throwaway_database) as conn:
        operator = conn.execute("SELECT is_superuser FROM auth_user WHERE username = 'operator'").fetchone()
        balance = conn.execute("SELECT c.balance FROM usage_creditaccount c JOIN auth_user u ON u.id = c.user_id "
                               "WHERE u.username = 'alice'").fetchone()
        provider = conn.execute("SELECT base_url FROM agents_provider WHERE name = 'openai'").fetchone()
    assert operator == (True,) and balance and balance[0] == 100 and provider == (fake_upstream.base_url,)
    assert (tmp_path / "aiwriter" / "alice.key").read_text().startswith("aiw_")
    assert (tmp_path / "backups" / "aiwriter.dump").stat().st_size > 0
