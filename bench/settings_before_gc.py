"""The deployed settings with the cyclic collector at CPython's defaults: the "before" of
aiwriter.daphne_tuning.tune_gc (issue 13, /v1 CPU).

    python -m bench.run --only none --compare bench.settings_before_gc
"""

from __future__ import annotations

from aiwriter import daphne_tuning
from aiwriter.settings import *  # noqa: F403

daphne_tuning._gc_tuned = True  # tune_gc() then does nothing
