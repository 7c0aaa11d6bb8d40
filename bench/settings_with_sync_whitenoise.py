"""The deployed settings with the stock (sync-only) WhiteNoiseMiddleware: the "before" of BENCHMARKS.md.

    python -m bench.run --settings bench.settings_with_sync_whitenoise --only 1
"""

from aiwriter.settings import *  # noqa: F403
from aiwriter.settings import MIDDLEWARE

MIDDLEWARE = [
    "whitenoise.middleware.WhiteNoiseMiddleware" if name == "aiwriter.static.AsyncWhiteNoiseMiddleware" else name
    for name in MIDDLEWARE
]
