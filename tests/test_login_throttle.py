"""Login throttling cannot be dodged by choosing one's address: the client address comes from the configured
number of trusted proxies (aiwriter/clientaddr.py), and failures are counted per username from anywhere as
well as per address (issue 12, item 3)."""

from __future__ import annotations

import re
import urllib.error
import urllib.parse
import urllib.request

import pytest

from aiwriter.clientaddr import address_from, client_address
from aiwriter.pages import LOGIN_MAX_FAILURES, LOGIN_MAX_FAILURES_PER_ADDRESS, LOGIN_MAX_FAILURES_PER_USERNAME
from tests.factories import make_user
from tests.fixtures_chat import run_daphne

pytestmark = pytest.mark.django_db

WRONG = {"username": "alice", "password": "wrong"}
RIGHT = {"username": "alice", "password": "pw-123456"}


def _login(client, body, *, peer="127.0.0.1", forwarded_for=None):
    extra = {"REMOTE_ADDR": peer}
    if forwarded_for is not None:
        extra["HTTP_X_FORWARDED_FOR"] = forwarded_for
    return client.post("/accounts/login/", body, **extra)


def test_a_client_chosen_x_forwarded_for_is_ignored_by_default(client, settings):
    assert settings.TRUSTED_PROXY_COUNT == 0
    make_user("alice")
    codes = [_login(client, WRONG, forwarded_for=f"203.0.113.{n}").status_code for n in range(12)]
    assert codes == [200] * LOGIN_MAX_FAILURES + [429] * (12 - LOGIN_MAX_FAILURES)
    assert _login(client, RIGHT, forwarded_for="198.51.100.1").status_code == 429


def test_twelve_wrong_passwords_from_rotating_addresses_are_throttled_per_username(client):
    """What daphne --proxy-headers did: every try arrives with a different (client-chosen) address."""
    make_user("alice")
    codes = [_login(client, WRONG, peer=f"203.0.113.{n}").status_code for n in range(12)]
    assert codes == [200] * LOGIN_MAX_FAILURES_PER_USERNAME + [429] * (12 - LOGIN_MAX_FAILURES_PER_USERNAME)
    # The username is locked out from everywhere for the window, even with the right password.
    assert _login(client, RIGHT, peer="198.51.100.1").status_code == 429
    assert "_auth_user_id" not in client.session
    # Other usernames are not.
    make_user("bob")
    assert _login(client, {"username": "bob", "password": "pw-123456"}, peer="203.0.113.1").status_code == 302


def test_one_address_trying_many_usernames_is_throttled(client):
    codes = [_login(client, {"username": f"user{n}", "password": "x"}, peer="203.0.113.9").status_code
             for n in range(LOGIN_MAX_FAILURES_PER_ADDRESS + 1)]
    assert codes == [200] * LOGIN_MAX_FAILURES_PER_ADDRESS + [429]
    # Logging in to one's own account from there does not reset it (it would, to a spray).
    make_user("mallory")
    assert _login(client, {"username": "mallory", "password": "pw-123456"}, peer="203.0.113.9").status_code == 429
    assert _login(client, {"username": "mallory", "password": "pw-123456"}, peer="203.0.113.10").status_code == 302


def test_behind_one_trusted_proxy_the_address_the_proxy_saw_counts(client, settings):
    settings.TRUSTED_PROXY_COUNT = 1
    make_user("alice")
    # The proxy (peer 10.0.0.2) appended the client's real address; what the client sent is left of it.
    codes = [_login(client, WRONG, peer="10.0.0.2", forwarded_for=f"203.0.113.{n}, 198.51.100.7").status_code
             for n in range(LOGIN_MAX_FAILURES + 1)]
    assert codes == [200] * LOGIN_MAX_FAILURES + [429]
    # Another client behind the same proxy is not locked out by that pair.
    assert _login(client, RIGHT, peer="10.0.0.2", forwarded_for="198.51.100.8").status_code == 302


@pytest.mark.parametrize(("peer", "forwarded", "proxies", "expected"), [
    ("10.0.0.2", "6.6.6.6, 198.51.100.7", 0, "10.0.0.2"),  # no trusted proxy: the header is ignored
    ("10.0.0.2", "6.6.6.6, 198.51.100.7", 1, "198.51.100.7"),  # the rightmost, written by our proxy
    ("10.0.0.3", "6.6.6.6, 198.51.100.7, 10.0.0.2", 2, "198.51.100.7"),  # two proxies: the 2nd from the right
    ("10.0.0.2", "", 1, "10.0.0.2"),  # fewer entries than proxies: not through them all, the peer
    ("10.0.0.3", "198.51.100.7", 2, "10.0.0.3"),
    ("10.0.0.2", "6.6.6.6, not-an-ip", 1, "10.0.0.2"),  # junk where our proxy writes: the peer, never the left
    ("10.0.0.2", " 2001:db8::1 ", 1, "2001:db8::1"),
])
def test_the_client_address_is_the_nth_from_the_right(peer, forwarded, proxies, expected):
    assert address_from(peer, forwarded, proxies) == expected


def test_client_address_reads_the_request(rf, settings):
    settings.TRUSTED_PROXY_COUNT = 1
    request = rf.get("/", REMOTE_ADDR="10.0.0.2", HTTP_X_FORWARDED_FOR="6.6.6.6,198.51.100.7")
    assert client_address(request) == "198.51.100.7"


def _login_over_http(base_url: str, body: dict, forwarded_for: str) -> int:
    """One login POST to a real server, with the CSRF cookie and token its login page hands out."""
    with urllib.request.urlopen(base_url + "/accounts/login/", timeout=10) as page:
        cookie = next(value.split(";")[0] for name, value in page.headers.items()
                      if name.lower() == "set-cookie" and value.startswith("csrftoken="))
        found = re.search(rb'name="csrfmiddlewaretoken" value="([^"]+)"', page.read())
        assert found is not None
        token = found.group(1).decode()
    request = urllib.request.Request(
        base_url + "/accounts/login/", data=urllib.parse.urlencode({**body, "csrfmiddlewaretoken": token}).encode(),
        headers={"Cookie": cookie, "X-Forwarded-For": forwarded_for})
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


@pytest.mark.pg
@pytest.mark.parametrize("proxy_count", ["0", "1"])
def test_spoofed_addresses_against_daphne_with_proxy_headers(transactional_db, proxy_count):
    """The deployment the issue found: daphne --proxy-headers (the leftmost X-Forwarded-For becomes the peer),
    12 wrong passwords each claiming another address. With TRUSTED_PROXY_COUNT=0 the per-username count stops
    them after 10; with 1, the entry our proxy appended counts and the pair stops them after 5."""
    from django.conf import settings

    if not settings.IS_POSTGRES:
        pytest.skip("a daphne process needs PostgreSQL (DATABASE_URL)")
    make_user("alice")
    limit = LOGIN_MAX_FAILURES if proxy_count == "1" else LOGIN_MAX_FAILURES_PER_USERNAME
    with run_daphne({"TRUSTED_PROXY_COUNT": proxy_count}, daphne_args=["--proxy-headers"]) as base_url:
        codes = [_login_over_http(base_url, WRONG, f"203.0.113.{n}, 198.51.100.7") for n in range(12)]
    assert codes == [200] * limit + [429] * (12 - limit)
