"""Test settings: the real settings module, plus a throw-away secret and a fast password hasher."""

import os
import sys

os.environ.setdefault("SECRET_KEY", "test-only-secret-key-0123456789abcdefghijklmnopqrstuvwxyz")
os.environ.setdefault("DEMO_CHUNK_DELAY_SECONDS", "0.005")
# No background sweeper in tests (and the daphne processes they start) unless a test asks for one.
os.environ.setdefault("SWEEPER_INTERVAL_SECONDS", "0")

from aiwriter.settings import *  # noqa: E402,F403

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"

# In-process tests keep plain per-thread connections (pytest-django creates, flushes and drops the test
# database through them, and threads close their own). A daphne or helper process that a test starts (no
# pytest there) gets the default: PostgreSQL's connection pool, as in production.
if "pytest" in sys.modules:
    DATABASES["default"].get("OPTIONS", {}).pop("pool", None)  # noqa: F405
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = False  # noqa: F405
