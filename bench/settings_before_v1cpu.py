"""The deployed settings without this round's /v1 CPU cuts (issue 13, third round): the "before".

    python -m bench.run --only none --compare bench.settings_before_v1cpu

In the server that loads these settings only: the cyclic collector at CPython's defaults (no `gc.freeze`, young
collections every 700 allocations) and Django's choices passed to psycopg as they are (usage.hotpath._plain).
"""

from __future__ import annotations

from aiwriter import daphne_tuning
from aiwriter.settings import *  # noqa: F403
from bench.settings_before_plain_params import MIDDLEWARE, __getattr__  # noqa: F401 - hotpath patched when loaded

daphne_tuning._gc_tuned = True  # tune_gc() then does nothing
