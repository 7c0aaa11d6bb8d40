"""The async turn start (conversations.turnstart) holds the chat's limits exactly under real concurrency on
PostgreSQL and Redis: one generation per conversation, at most MAX_CONCURRENT_CONVERSATIONS per user, one
conversation from many identical creates — alone and racing the sync path (threads) at the same time."""

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connections

from conversations import locks, services, turnstart
from conversations.models import Conversation, Message
from tests.factories import make_agent, make_user

pytestmark = [pytest.mark.pg, pytest.mark.redis, pytest.mark.django_db(transaction=True),
              pytest.mark.usefixtures("close_thread_connections")]

REFUSALS = (locks.ConversationBusy, locks.TooManyConcurrent)


def _sync_turn(barrier: threading.Barrier | None, user, frame: dict):
    try:
        if barrier is not None:
            barrier.wait(timeout=20)
        return turnstart.sync_begin(user, None, frame.get("conversation_id"), frame.get("agent"), "same",
                                    frame["content"], None, False)
    except Exception as exc:  # noqa: BLE001 - the outcome is what the test counts
        return exc
    finally:
        connections.close_all()


async def _race(user, async_frames: list[dict], sync_frames: list[dict]) -> list:
    """Every frame's turn at once: the async ones as tasks on this loop, the sync ones in threads."""
    barrier = threading.Barrier(len(sync_frames) + 1) if sync_frames else None
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(max(1, len(sync_frames))) as threads:
        in_threads = [loop.run_in_executor(threads, _sync_turn, barrier, user, f) for f in sync_frames]
        if barrier is not None:
            await loop.run_in_executor(None, barrier.wait, 20)
        tasks = [turnstart.begin_turn(user=user, api_key=None, conversation_id=f.get("conversation_id"),
                                      agent=f.get("agent"), project="same", content=f["content"], client_id=None,
                                      new=False) for f in async_frames]
        return list(await asyncio.gather(*tasks, *in_threads, return_exceptions=True))


def _split(results: list) -> tuple[list[services.Exchange], list[BaseException]]:
    begun = [r for r in results if isinstance(r, services.Exchange)]
    refused = [r for r in results if not isinstance(r, services.Exchange)]
    assert all(isinstance(r, REFUSALS) for r in refused), [repr(r) for r in refused if not isinstance(r, REFUSALS)]
    return begun, refused


def _processing(user) -> list[int]:
    return list(Message.objects.filter(conversation__owner=user, role="assistant", status="processing")
                .values_list("conversation_id", flat=True))


async def _end(exchanges: list[services.Exchange]) -> None:
    for exchange in exchanges:
        await sync_to_async(services.finish_reply)(exchange, status="success", content="done")
        await sync_to_async(services.release_lock)(exchange)


@pytest.mark.parametrize("with_sync_path", [False, True], ids=["async-only", "async-and-sync"])
async def test_many_turns_at_once_keep_one_per_conversation_and_three_per_user(with_sync_path):
    agent = await sync_to_async(make_agent)()
    user = await sync_to_async(make_user)("racer")
    conversations = [await sync_to_async(Conversation.objects.create)(owner=user, agent=agent, project=f"c{i}")
                     for i in range(8)]
    frames = [{"conversation_id": c.pk, "content": f"turn {i} in {c.pk}"} for i in range(5) for c in conversations]
    for _ in range(3):  # rounds: each starts with every conversation free
        sync_frames = frames[::3] if with_sync_path else []
        async_frames = [f for f in frames if f not in sync_frames]
        begun, refused = _split(await _race(user, async_frames, sync_frames))
        assert len(begun) == settings.MAX_CONCURRENT_CONVERSATIONS == 3
        assert len({e.conversation.pk for e in begun}) == 3  # one lock per conversation
        assert len(refused) == len(frames) - 3
        assert sorted(await sync_to_async(_processing)(user)) == sorted(e.conversation.pk for e in begun)
        await _end(begun)
    # Every stored exchange is whole: sequence numbers unique and dense per conversation.
    for conversation in conversations:
        numbers = await sync_to_async(list)(Message.objects.filter(conversation=conversation)
                                            .order_by("sequence").values_list("sequence", flat=True))
        assert numbers == list(range(1, len(numbers) + 1))


async def test_identical_creates_at_once_make_one_conversation_with_one_turn():
    agent = await sync_to_async(make_agent)()
    user = await sync_to_async(make_user)("creator")
    frames = [{"agent": agent.slug, "content": f"hello {i}"} for i in range(30)]
    begun, refused = _split(await _race(user, frames[:20], frames[20:]))
    assert await sync_to_async(Conversation.objects.filter(owner=user).count)() == 1
    assert len(begun) == 1 and all(isinstance(r, locks.ConversationBusy) for r in refused)
    assert await sync_to_async(Message.objects.filter(conversation__owner=user).count)() == 2
    await _end(begun)
