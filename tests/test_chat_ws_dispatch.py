"""A socket's frames are handled on the event loop: none waits for the process's sync thread."""

import asyncio
import time

import pytest
from asgiref.sync import sync_to_async

from tests.factories import make_api_key
from tests.test_chat_ws import _connect

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.mark.pg  # the credential check runs on the async pool (PostgreSQL)
async def test_a_frame_is_answered_while_the_sync_thread_is_busy(alice):
    raw_key = (await sync_to_async(make_api_key)(alice))[1]
    communicator = await _connect(raw_key)
    # Occupy the thread that Channels' own dispatch hops to (thread-sensitive sync_to_async) for a second.
    busy = asyncio.create_task(sync_to_async(time.sleep)(1.0))
    await asyncio.sleep(0.05)
    started = time.monotonic()
    await communicator.send_to(text_data="not json")
    frame = await communicator.receive_json_from(timeout=5)
    answered_in = time.monotonic() - started
    assert frame["type"] == "error" and frame["code"] == "bad_request"
    assert answered_in < 0.5, f"the frame waited {answered_in:.2f}s for the sync thread"
    await busy
    await communicator.disconnect()
