"""The deployed settings with Django's stock middleware instead of aiwriter.asyncmw (a thread hop per
middleware step): the "before" of BENCHMARKS.md.

    python -m bench.run --only none --compare bench.settings_stock_middleware
"""

from aiwriter.settings import *  # noqa: F403
from aiwriter.settings import MIDDLEWARE

_STOCK = {
    "aiwriter.asyncmw.SecurityMiddleware": "django.middleware.security.SecurityMiddleware",
    "aiwriter.asyncmw.SessionMiddleware": "django.contrib.sessions.middleware.SessionMiddleware",
    "aiwriter.asyncmw.CommonMiddleware": "django.middleware.common.CommonMiddleware",
    "aiwriter.asyncmw.CsrfViewMiddleware": "django.middleware.csrf.CsrfViewMiddleware",
    "aiwriter.asyncmw.AuthenticationMiddleware": "django.contrib.auth.middleware.AuthenticationMiddleware",
    "aiwriter.asyncmw.MessageMiddleware": "django.contrib.messages.middleware.MessageMiddleware",
    "aiwriter.asyncmw.XFrameOptionsMiddleware": "django.middleware.clickjacking.XFrameOptionsMiddleware",
}
MIDDLEWARE = [_STOCK.get(name, name) for name in MIDDLEWARE]
