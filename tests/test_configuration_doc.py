"""docs/configuration.md lists every environment variable aiwriter reads, and nothing it does not read."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Where the project reads its environment: settings, and the few commands and modules that read it directly.
SOURCES = [ROOT / "aiwriter" / "settings.py", *ROOT.glob("*/management/commands/*.py"), *ROOT.glob("aiwriter/*.py"),
           *ROOT.glob("agents/**/*.py"), *ROOT.glob("conversations/*.py"), *ROOT.glob("usage/*.py")]
READ = re.compile(r"""(?:env_(?:str|bool|int|float|list)|os\.environ\.get|os\.getenv|os\.environ\.setdefault)"""
                  r"""\(\s*["']([A-Z][A-Z0-9_]+)["']|os\.environ\[\s*["']([A-Z][A-Z0-9_]+)["']\s*\]""")
NOT_SETTINGS = {"DJANGO_SETTINGS_MODULE"}  # set by manage.py / asgi.py themselves


def variables_read() -> set[str]:
    names: set[str] = set()
    for path in SOURCES:
        for match in READ.finditer(path.read_text()):
            names.add(match[1] or match[2])
    return names - NOT_SETTINGS


def variables_documented() -> set[str]:
    names: set[str] = set()
    for line in (ROOT / "docs" / "configuration.md").read_text().splitlines():
        if line.startswith("| `"):
            first_cell = line.split("|")[1]
            names.update(re.findall(r"`([A-Z][A-Z0-9_]+)`", first_cell))
    return names


def test_the_scan_finds_what_settings_reads():
    read = variables_read()
    assert {"DEBUG", "DATABASE_URL", "MODERATION_HOOK", "OPENAI_MAX_MESSAGES", "ADMIN_PASSWORD",
            "PROMETHEUS_MULTIPROC_DIR"} <= read


def test_every_variable_read_is_documented():
    missing = variables_read() - variables_documented()
    assert not missing, f"add these to docs/configuration.md: {sorted(missing)}"


def test_every_documented_variable_is_read():
    stale = variables_documented() - variables_read()
    assert not stale, f"docs/configuration.md lists variables nothing reads: {sorted(stale)}"
