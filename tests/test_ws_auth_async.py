"""A socket's credential check on the async pool (ws_auth.credential_is_live_async) answers as the sync one does,
and answers the usual cases (a key; a live database session) with one pool statement, no thread hop."""

from datetime import timedelta

import pytest
from asgiref.sync import sync_to_async
from django.test import Client
from django.utils import timezone

from aiwriter import dbpool
from aiwriter.ws_auth import credential_is_live, credential_is_live_async
from tests.factories import make_api_key, make_user

pytestmark = [pytest.mark.pg, pytest.mark.django_db(transaction=True),
              pytest.mark.usefixtures("close_thread_connections")]


async def _both(user, api_key, session) -> tuple[bool, bool, int]:
    """(sync answer, async answer, pool statements the async one used)."""
    pool = await dbpool.get_pool()
    before = pool.get_stats().get("requests_num", 0)
    live = await credential_is_live_async(user, api_key, session)
    used = pool.get_stats().get("requests_num", 0) - before
    return await sync_to_async(credential_is_live)(user, api_key, session), live, used


def _logged_in(user):
    client = Client()
    client.force_login(user)
    return client


async def test_keys_answer_alike_on_the_pool():
    user = await sync_to_async(make_user)("keyed")
    api_key, _ = await sync_to_async(make_api_key)(user)
    assert await _both(user, api_key, None) == (True, True, 1)
    api_key.expires_at = timezone.now() - timedelta(seconds=1)
    await sync_to_async(api_key.save)()
    assert await _both(user, api_key, None) == (False, False, 1)
    api_key.expires_at, api_key.revoked_at = None, timezone.now()
    await sync_to_async(api_key.save)()
    assert await _both(user, api_key, None) == (False, False, 1)
    api_key.revoked_at, user.is_active = None, False
    await sync_to_async(api_key.save)()
    await sync_to_async(user.save)()
    assert await _both(user, api_key, None) == (False, False, 1)


async def test_sessions_answer_alike():
    user = await sync_to_async(make_user)("sessioned")
    client = await sync_to_async(_logged_in)(user)
    session = await sync_to_async(lambda: client.session)()
    assert await _both(user, None, session) == (True, True, 1)
    other = await sync_to_async(make_user)("someone-else")
    assert (await _both(other, None, session))[:2] == (False, False)  # another user's session
    user.is_active = False
    await sync_to_async(user.save)()
    assert (await _both(user, None, session))[:2] == (False, False)
    user.is_active = True
    await sync_to_async(user.save)()
    # A changed password: Django's own check answers (and flushes the session); then it is gone on both.
    await sync_to_async(user.set_password)("another-pw-123")
    await sync_to_async(user.save)()
    assert await credential_is_live_async(user, None, session) is False
    assert await _both(user, None, session) == (False, False, 1)
    # Logged out: the session row is gone.
    client = await sync_to_async(_logged_in)(user)
    session = await sync_to_async(lambda: client.session)()
    assert (await _both(user, None, session))[:2] == (True, True)
    await sync_to_async(client.logout)()
    assert await _both(user, None, session) == (False, False, 1)
