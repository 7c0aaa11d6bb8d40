"""The deployed settings with Django's stock middleware swapped for aiwriter.asyncmw (no thread hop per
middleware step). Before/after: `python -m bench.run --only none --compare bench.settings_inline_middleware`.
"""

from aiwriter.settings import *  # noqa: F403
from aiwriter.settings import MIDDLEWARE

_INLINE = {
    "django.middleware.security.SecurityMiddleware": "aiwriter.asyncmw.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware": "aiwriter.asyncmw.SessionMiddleware",
    "django.middleware.common.CommonMiddleware": "aiwriter.asyncmw.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware": "aiwriter.asyncmw.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware": "aiwriter.asyncmw.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware": "aiwriter.asyncmw.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware": "aiwriter.asyncmw.XFrameOptionsMiddleware",
}
MIDDLEWARE = [_INLINE.get(name, name) for name in MIDDLEWARE]
