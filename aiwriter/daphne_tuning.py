"""Daphne's HTTP requests without twisted's form parsing: an API body is never read as a form here.

Twisted parses a POST body into `request.args` when its Content-Type is a form, and to find out it runs the stdlib
e-mail header parser on the Content-Type of every POST: about 5 % of the server's CPU for a /v1 call
(docs/BENCHMARKS.md). Daphne never reads `request.args` (it hands the raw body to the ASGI app, which parses forms
itself), so its requests are built with twisted's own switch for that, `parsePOSTFormSubmission=False` (which
twisted also recommends against the memory a large upload takes).
"""

from __future__ import annotations

import gc
import sys
from typing import Any


def apply() -> None:
    """In a daphne process (its HTTP module already imported), its request class without form parsing; else nothing.
    In a daphne server (started from its command line), the collector tuned too (`tune_gc`)."""
    if "daphne.cli" in sys.modules:
        tune_gc()
    module = sys.modules.get("daphne.http_protocol")
    base = getattr(module, "WebRequest", None)
    if base is None or getattr(base, "_aiwriter_no_form_parsing", False):
        return

    class WebRequest(base):  # type: ignore[misc, valid-type]
        _aiwriter_no_form_parsing = True

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["parsePOSTFormSubmission"] = False
            super().__init__(*args, **kwargs)

    module.WebRequest = WebRequest  # type: ignore[union-attr]  # looked up by HTTPFactory.buildProtocol per connection


# Young-generation collections per allocated-minus-freed objects (CPython's default is 700).
GC_YOUNG_THRESHOLD = 20_000
_gc_tuned = False


def tune_gc() -> None:
    """The cyclic collector, tuned for a server: what the process built at start (Django, the apps, their modules)
    is moved out of its reach (`gc.freeze`), and young collections run every GC_YOUNG_THRESHOLD allocations instead
    of every 700. A /v1 call allocates a few thousand objects, nearly all freed by reference counting; with the
    default threshold the collector ran several times per call and each older collection walked the whole
    framework's objects again (docs/BENCHMARKS.md). Garbage cycles are still collected, in fewer, larger passes."""
    global _gc_tuned
    if _gc_tuned:
        return
    _gc_tuned = True
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)
