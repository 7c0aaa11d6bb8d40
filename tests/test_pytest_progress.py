"""The suite's own output: every collected test is reported under its own id, so the progress ends at 100 %."""

from __future__ import annotations

import subprocess
import sys

import pytest
from django.conf import settings

pytestmark = pytest.mark.timeout(300)


def test_fuzz_items_have_their_own_ids_and_progress_reaches_100_percent():
    # A few schemathesis items (one per operation): before, they shared one node id and progress stopped early.
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/test_schema_fuzz.py", "-k", "test_api_as_staff and GET and me",
         "-p", "no:randomly"],
        cwd=settings.BASE_DIR, capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith(".")]
    assert lines and lines[-1].rstrip().endswith("[100%]"), result.stdout
