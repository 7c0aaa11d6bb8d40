"""The client's address, the one place it is worked out (login throttling, logs).

Behind N reverse proxies that each append the address they received the request from to X-Forwarded-For
(nginx: `proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;`), the last N entries were written by
proxies we run, and the Nth from the right is the address that connected to the outermost one: the client.
Everything left of it was sent by the client and is its own choice, so it is never used. With
TRUSTED_PROXY_COUNT = 0 (the default: no proxy, or one we do not trust) X-Forwarded-For is ignored and the
socket's peer address is the client (docs/deploy.md, "Client addresses").
"""

from __future__ import annotations

import ipaddress

from django.conf import settings
from django.http import HttpRequest


def _valid(address: str) -> str | None:
    try:
        return str(ipaddress.ip_address(address.strip()))
    except ValueError:
        return None


def address_from(peer: str, forwarded_for: str, trusted_proxies: int) -> str:
    """The client's address given the socket peer, the X-Forwarded-For header (several joined by commas) and
    the number of proxies in front of us that we trust."""
    if trusted_proxies <= 0:
        return peer
    hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
    if len(hops) < trusted_proxies:
        # Fewer entries than our own proxies write: the request did not come through them all (or they are
        # misconfigured). The peer is the one address that is not the client's say.
        return peer
    return _valid(hops[-trusted_proxies]) or peer


def client_address(request: HttpRequest) -> str:
    """The client's address for an HTTP request (also for the ASGI requests daphne makes)."""
    return address_from(request.META.get("REMOTE_ADDR", "") or "", request.META.get("HTTP_X_FORWARDED_FOR", ""),
                        settings.TRUSTED_PROXY_COUNT)

