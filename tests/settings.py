"""Test settings: the real settings module, plus a throw-away secret and a fast password hasher."""

import os

os.environ.setdefault("SECRET_KEY", "test-only-secret-key-0123456789abcdefghijklmnopqrstuvwxyz")
os.environ.setdefault("DEMO_CHUNK_DELAY_SECONDS", "0.005")
# No background sweeper in tests (and the daphne processes they start) unless a test asks for one.
os.environ.setdefault("SWEEPER_INTERVAL_SECONDS", "0")

from aiwriter.settings import *  # noqa: E402,F403

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
