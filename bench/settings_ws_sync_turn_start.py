"""The deployed settings with a websocket turn's start and credential check back on the sync services, each a
`sync_to_async` hop (the "before" of conversations/turnstart.py in BENCHMARKS.md):

    python -m bench.run --settings bench.settings_ws_sync_turn_start --only 2,3
"""

from aiwriter.settings import *  # noqa: F403

WS_TURN_START_ON_POOL = False
