"""daphne's own command line, on uvloop's event loop.

    python -m aiwriter.serve -b 127.0.0.1 -p 8001 aiwriter.asgi:application

Takes exactly daphne's arguments. daphne creates its event loop when its server module is imported, before it
loads the application, so the loop can only be chosen by a launcher that runs first. uvloop runs Twisted's asyncio
reactor unchanged (it implements the loop API the reactor uses) and takes 12-15 % less server CPU per `/v1` call
than the stock loop (docs/BENCHMARKS.md). `SERVER_EVENT_LOOP=asyncio`, or a platform without uvloop, keeps the stock
loop; plain `daphne ...` still works and is that.
"""

from __future__ import annotations

import asyncio
import os
import sys


def choose_event_loop() -> None:
    """Installs uvloop's loop policy unless told not to (SERVER_EVENT_LOOP=asyncio) or unavailable."""
    if os.environ.get("SERVER_EVENT_LOOP", "uvloop").strip().lower() == "asyncio":
        return
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def main() -> int:
    choose_event_loop()
    # Only after the policy: importing daphne's CLI imports its server module, which creates the loop.
    from daphne import server
    from daphne.cli import CommandLineInterface

    loop = type(server.twisted_loop)
    print(f"aiwriter: daphne on {loop.__module__}.{loop.__qualname__}", file=sys.stderr, flush=True)
    CommandLineInterface.entrypoint()
    return 0


if __name__ == "__main__":
    sys.exit(main())
