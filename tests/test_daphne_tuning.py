"""Daphne's requests skip twisted's form parsing (aiwriter/daphne_tuning.py); the body still reaches Django whole."""

from __future__ import annotations

from types import SimpleNamespace

from daphne import http_protocol

from aiwriter import daphne_tuning


def _channel() -> SimpleNamespace:
    server = SimpleNamespace(protocol_connected=lambda request: None)
    return SimpleNamespace(getPeer=lambda: None, getHost=lambda: None, transport=None,
                           factory=SimpleNamespace(server=server))


def test_daphne_requests_are_built_without_form_parsing_once():
    daphne_tuning.apply()
    tuned = http_protocol.WebRequest
    daphne_tuning.apply()  # a second call (another import of the app) changes nothing
    assert http_protocol.WebRequest is tuned
    request = tuned(_channel(), False)
    assert request._parsePOSTFormSubmission is False


def test_a_form_body_still_reaches_the_app_untouched():
    daphne_tuning.apply()
    request = http_protocol.WebRequest(_channel(), False)
    request.gotLength(7)
    request.content.write(b"a=1&b=2")
    request.requestHeaders.setRawHeaders(b"content-type", [b"application/x-www-form-urlencoded"])
    request.requestHeaders.setRawHeaders(b"content-length", [b"7"])
    request.process = lambda: None  # daphne's process() hands request.content to the ASGI app
    request.requestReceived(b"POST", b"/accounts/login/", b"HTTP/1.1")
    assert request.args == {} and request.content.read() == b"a=1&b=2"


def test_a_daphne_server_process_gets_the_collector_tuned_and_others_do_not():
    import gc
    import subprocess
    import sys

    script = ("import gc, sys; import daphne.cli; from aiwriter import daphne_tuning; "
              "before = gc.get_threshold(); daphne_tuning.apply(); daphne_tuning.apply(); "
              "after = gc.get_threshold(); "
              "print(before[0], after[0], after[1:] == before[1:], gc.get_freeze_count() > 0)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["700", str(daphne_tuning.GC_YOUNG_THRESHOLD), "True", "True"]

    threshold = gc.get_threshold()
    daphne_tuning.apply()  # not a daphne server (this test process): the collector is left alone
    assert gc.get_threshold() == threshold
