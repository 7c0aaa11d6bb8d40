"""A websocket turn's start on the event loop (conversations.turnstart) does what the sync services do.

The same script of turns — a new conversation, the 5-minute dedupe, `new`, a replayed client_id, a second turn,
moderation, the key's limits and access, a busy conversation, someone else's conversation — is played once by
the sync services (turnstart.sync_begin, the reference, as on SQLite) and once by turnstart.begin_turn on the
async pool, for two users alike: the outcomes and the rows they leave must match, and the usual turn must take
the few pool statements it is built from (no sync fallback).
"""

from decimal import Decimal

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.cache import cache

from aiwriter import dbpool
from aiwriter.errors import ApiError
from conversations import locks, prompt, services, turnstart
from conversations.models import Conversation, Message
from tests.factories import make_agent, make_api_key, make_model, make_user

pytestmark = [pytest.mark.pg, pytest.mark.redis, pytest.mark.django_db(transaction=True),
              pytest.mark.usefixtures("close_thread_connections")]

MESSAGE_FIELDS = ["role", "content", "status", "error_code", "error_message", "sequence", "client_id",
                  "prompt_tokens", "completion_tokens", "cost"]
CONVERSATION_FIELDS = ["project", "title", "message_count", "total_tokens", "has_success", "agent_id"]


async def _turn(path: str, user, api_key, **frame) -> services.Exchange:
    frame = {"conversation_id": None, "agent": None, "project": "", "client_id": None, "new": False, **frame}
    if path == "sync":
        return await sync_to_async(turnstart.sync_begin)(user, api_key, frame.pop("conversation_id"),
                                                         frame.pop("agent"), frame.pop("project"),
                                                         frame.pop("content"), frame.pop("client_id"),
                                                         frame.pop("new"))
    return await turnstart.begin_turn(user=user, api_key=api_key, **frame)


async def _finish(exchange: services.Exchange) -> None:
    await sync_to_async(services.finish_reply)(exchange, status="success", content="An answer.", prompt_tokens=3,
                                               completion_tokens=4, cost=Decimal("0.0000010000"))
    await sync_to_async(services.release_lock)(exchange)


def _outcome(result) -> tuple:
    if isinstance(result, BaseException):
        return ("error", type(result).__name__, getattr(result, "code", ""))
    reply, question = result.reply, result.user_message
    return ("exchange", result.replay, result.finished, result.conversation.title, result.conversation.message_count,
            result.conversation.agent.slug, result.conversation.agent.model.name,
            [getattr(question, f) for f in MESSAGE_FIELDS], [getattr(reply, f) for f in MESSAGE_FIELDS],
            reply.reply_to_id == question.pk, result.extra.get("key_hold") and result.extra["key_hold"].tokens)


def _rows(user) -> list:
    """The user's conversations and messages, ids replaced by their order (the two users' ids differ)."""
    rows = []
    for conversation in Conversation.objects.filter(owner=user).order_by("pk"):
        messages = list(Message.objects.filter(conversation=conversation).order_by("sequence"))
        ids: dict[int | None, int] = {m.pk: i for i, m in enumerate(messages)}
        rows.append(([getattr(conversation, f) for f in CONVERSATION_FIELDS],
                     [([getattr(m, f) for f in MESSAGE_FIELDS], ids.get(m.reply_to_id)) for m in messages]))
    return rows


async def _play(path: str, user, api_key, agent, stranger_conversation) -> list:
    """The script; returns each step's outcome."""
    outcomes = []

    async def step(finish: bool = False, **frame):
        try:
            result = await _turn(path, user, api_key, **frame)
        except ApiError as exc:
            outcomes.append(_outcome(exc))
            return None
        outcomes.append(await sync_to_async(_outcome)(result))
        if finish and not result.finished:
            await _finish(result)
        return result

    first = await step(agent=agent.slug, project="p", content="Hello   the\nwide sea", client_id="c1")
    await step(agent=agent.slug, project="p", content="again", client_id="c9")  # the lock is held: busy
    await _finish(first)
    await step(agent=agent.slug, project="p", content="Hello   the\nwide sea", client_id="c1")  # dedupe + replay
    await step(finish=True, conversation_id=first.conversation.pk, content="second", client_id="c2")
    await step(finish=True, agent=str(agent.pk), project="p", content="by id, deduplicated")
    await step(conversation_id=first.conversation.pk, content="a forbidden word")  # moderation
    await step(finish=True, agent=agent.slug, project="p", content="a new one", new=True, client_id="c3")
    await step(agent=agent.slug, project="p", content="resent", new=True, client_id="c3")  # replay via new
    await step(conversation_id=first.conversation.pk, content="x" * (settings.MAX_MESSAGE_CHARS + 1))
    await step(conversation_id=first.conversation.pk, content="   ")
    await step(conversation_id=stranger_conversation.pk, content="not mine")
    await step(agent="no-such-agent", project="p", content="hello")
    await step(agent="", project="p", content="hello")
    return outcomes


async def test_both_paths_give_the_same_outcomes_and_write_the_same_rows(settings):
    settings.MODERATION_BLOCKLIST = ["forbidden"]
    agent = await sync_to_async(make_agent)(model=await sync_to_async(make_model)(max_output_tokens=50))
    stranger = await sync_to_async(make_user)("stranger")
    stranger_conversation = await sync_to_async(Conversation.objects.create)(owner=stranger, agent=agent)
    played = {}
    for path in ("sync", "async"):
        user = await sync_to_async(make_user)(f"by-{path}")
        api_key, _ = await sync_to_async(make_api_key)(user)
        api_key.rpm, api_key.tpm = 100, 100_000
        await sync_to_async(api_key.save)()
        played[path] = (await _play(path, user, api_key, agent, stranger_conversation),
                        await sync_to_async(_rows)(user))
    assert played["async"][0] == played["sync"][0]
    assert played["async"][1] == played["sync"][1]
    assert [o[2] for o in played["sync"][0] if o[0] == "error"] == [
        "conversation_busy", "message_too_long", "bad_request", "not_found", "unknown_agent", "unknown_agent"]
    assert [o[1] for o in played["sync"][0] if o[0] == "exchange"] == [False, True, False, False, False, False, True]


async def test_a_key_limited_to_other_models_finds_no_agent_on_either_path():
    agent = await sync_to_async(make_agent)()
    other = await sync_to_async(make_model)()
    outcomes = []
    for path in ("sync", "async"):
        user = await sync_to_async(make_user)(f"limited-{path}")
        api_key, _ = await sync_to_async(make_api_key)(user)
        await sync_to_async(api_key.allowed_models.add)(other)
        mine = await sync_to_async(Conversation.objects.create)(owner=user, agent=agent)
        for frame in ({"agent": agent.slug}, {"agent": agent.slug, "new": True}, {"conversation_id": mine.pk}):
            with pytest.raises(services.UnknownAgent):
                await _turn(path, user, api_key, content="hi", **frame)
            outcomes.append(await sync_to_async(Message.objects.filter(conversation__owner=user).count)())
        # The create and its agent check are one statement on the pool: a refused agent leaves no conversation.
        assert await sync_to_async(Conversation.objects.filter(owner=user).count)() == 1
    assert outcomes == [0] * 6


async def test_a_usual_turn_is_a_few_statements_on_the_pool():
    agent = await sync_to_async(make_agent)()
    user = await sync_to_async(make_user)("pooled")
    pool = await dbpool.get_pool()

    async def statements(**frame) -> tuple[int, services.Exchange]:
        before = pool.get_stats().get("requests_num", 0)
        exchange = await turnstart.begin_turn(user=user, api_key=None, **frame)
        return pool.get_stats().get("requests_num", 0) - before, exchange

    # The checked create with the agent's lookup (one transaction); the reads after the lock with the insert (one
    # statement), the prompt's history pipelined with them; and the prompt's other reads (memory) alongside: the
    # prompt's build then reads nothing.
    used, exchange = await statements(conversation_id=None, agent=agent.slug, project="", content="one",
                                      client_id="a", new=False)
    assert used == 3 and exchange.lock is not None and exchange.lock.backend == "redis"
    before = pool.get_stats().get("requests_num", 0)
    await prompt.build_prompt_async(conversation=exchange.conversation, user_message=exchange.user_message,
                                    user=user, prefetched=exchange.extra["prompt"])
    assert pool.get_stats().get("requests_num", 0) == before
    # The dedupe cache entry the sync create_conversation reads first (written on the loop, to the same key).
    key = services._dedupe_cache_key(user.pk, agent.pk, "")
    assert await sync_to_async(cache.get)(key) == exchange.conversation.pk
    await _finish(exchange)
    # The conversation with its agent, the reads after the lock with the insert (and the history), the memory.
    used, exchange = await statements(conversation_id=exchange.conversation.pk, agent=None, project="",
                                      content="two", client_id="b", new=False)
    assert used == 3 and [exchange.user_message.sequence, exchange.reply.sequence] == [3, 4]
    await _finish(exchange)


async def test_with_dedupe_off_a_new_conversation_leaves_no_entry_and_no_warning(settings, caplog):
    settings.CONVERSATION_DEDUPE_SECONDS = 0  # Redis refuses an expiry of 0: nothing is written at all
    agent = await sync_to_async(make_agent)()
    user = await sync_to_async(make_user)("no-dedupe")
    exchange = await turnstart.begin_turn(user=user, api_key=None, conversation_id=None, agent=agent.slug,
                                          project="", content="one", client_id=None, new=False)
    assert await sync_to_async(cache.get)(services._dedupe_cache_key(user.pk, agent.pk, "")) is None
    assert "not written" not in caplog.text
    await _finish(exchange)


async def test_without_redis_the_turn_takes_the_sync_path_and_its_lease(no_redis, settings):
    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    agent = await sync_to_async(make_agent)()
    user = await sync_to_async(make_user)("leased")
    exchange = await turnstart.begin_turn(user=user, api_key=None, conversation_id=None, agent=agent.slug,
                                          project="", content="one", client_id=None, new=False)
    assert exchange.lock is not None and exchange.lock.backend == "db"
    with pytest.raises(locks.ConversationBusy):
        await turnstart.begin_turn(user=user, api_key=None, conversation_id=exchange.conversation.pk, agent=None,
                                   project="", content="two", client_id=None, new=False)
    await _finish(exchange)


async def test_an_id_past_bigint_is_not_found_on_both_paths():
    user = await sync_to_async(make_user)("huge")
    huge = 2**70
    for path in ("sync", "async"):
        with pytest.raises(ApiError) as caught:
            await _turn(path, user, None, conversation_id=huge, content="hi")
        assert caught.value.code == "not_found"
    with pytest.raises(ApiError) as caught:
        await turnstart.assert_owned(user=user, conversation_id=huge)
    assert caught.value.code == "not_found"


async def test_a_failed_create_raises_as_on_the_sync_path_and_leaves_the_pool_usable():
    from django.db import DataError

    agent = await sync_to_async(make_agent)()
    user = await sync_to_async(make_user)("too-long")
    for path in ("sync", "async"):
        with pytest.raises(DataError):  # a project past its column's 100 characters
            await _turn(path, user, None, agent=agent.slug, project="p" * 101, content="hi")
    exchange = await turnstart.begin_turn(user=user, api_key=None, conversation_id=None, agent=agent.slug,
                                          project="fine", content="hi", client_id=None, new=False)
    assert exchange.conversation.project == "fine"
    assert await sync_to_async(Conversation.objects.filter(owner=user).count)() == 1
    await _finish(exchange)


async def test_the_experiment_switch_puts_the_turn_back_on_the_sync_services(settings):
    settings.WS_TURN_START_ON_POOL = False  # bench/settings_ws_sync_turn_start.py, the "before" of the benchmark
    agent = await sync_to_async(make_agent)()
    user = await sync_to_async(make_user)("switched")
    pool = await dbpool.get_pool()
    before = pool.get_stats().get("requests_num", 0)
    exchange = await turnstart.begin_turn(user=user, api_key=None, conversation_id=None, agent=agent.slug,
                                          project="", content="one", client_id=None, new=False)
    await turnstart.assert_owned(user=user, conversation_id=exchange.conversation.pk)
    assert pool.get_stats().get("requests_num", 0) == before
    await _finish(exchange)


def _world_known_to_the_database(name: str):
    """A user whose database knows of generations Redis does not (a lease row, a `processing` reply): in `busy` a
    reply still being written (recent), in `stuck` one dead past its lease, and `other` holding a live lease."""
    from datetime import timedelta

    from django.utils import timezone

    from conversations.models import GenerationLease

    user, agent = make_user(name), make_agent()
    made = {}
    for label in ("busy", "stuck", "free", "other"):
        conversation = Conversation.objects.create(owner=user, agent=agent, message_count=2 if label != "free" else 0)
        made[label] = conversation
        if label in ("busy", "stuck"):
            question = Message.objects.create(conversation=conversation, role="user", content="q", sequence=1,
                                              status="processing")
            reply = Message.objects.create(conversation=conversation, role="assistant", content="half", sequence=2,
                                           status="processing", reply_to=question)
            if label == "stuck":
                Message.objects.filter(pk=reply.pk).update(
                    updated_at=timezone.now() - timedelta(seconds=settings.CONVERSATION_LOCK_SECONDS + 60))
    GenerationLease.objects.create(conversation=made["other"], owner=user, token="t",
                                   expires_at=timezone.now() + timedelta(seconds=60))
    return user, made


@pytest.mark.parametrize("path", ["sync", "async"])
async def test_what_only_the_database_knows_refuses_or_sweeps_alike(path, settings):
    """The reads after the lock (one statement with the insert on the pool): a conversation the database knows is
    running is busy, the owner's running conversations count against the cap, a reply stuck past its lease is
    ended and the turn goes on; nothing is stored for a refused turn."""
    settings.MAX_CONCURRENT_CONVERSATIONS = 3
    user, made = await sync_to_async(_world_known_to_the_database)(f"dbknows-{path}")

    async def count() -> int:
        return await sync_to_async(Message.objects.filter(conversation__owner=user).count)()

    before = await count()
    with pytest.raises(locks.ConversationBusy):
        await _turn(path, user, None, conversation_id=made["busy"].pk, content="again")
    assert await count() == before
    # busy and other are running (database), and this turn would make three: within the cap of 3.
    exchange = await _turn(path, user, None, conversation_id=made["stuck"].pk, content="after the crash")
    swept = await sync_to_async(Message.objects.get)(conversation=made["stuck"], sequence=2)
    assert swept.status == "error" and swept.content == "half"
    assert [exchange.user_message.sequence, exchange.reply.sequence] == [3, 4]
    assert exchange.extra.get("prompt") is None or exchange.extra["prompt"].history is None  # read again later
    # Now busy, other and stuck are running: a fourth is over the cap, and nothing is stored for it.
    stored = await count()
    with pytest.raises(locks.TooManyConcurrent):
        await _turn(path, user, None, conversation_id=made["free"].pk, content="one more")
    assert await count() == stored
    await _finish(exchange)


@pytest.mark.parametrize("quota", [False, True])
async def test_a_turn_reads_the_quota_limits_of_a_new_project_ahead_of_its_hold(quota):
    """The hold's read of the limits of a project it has not met (usage.hotpath.begin_call) is made while the turn
    begins, alongside the memory search, and cached as begin_call would cache it: the hold then reads nothing."""
    from usage.billing import holds
    from usage.models import Quota
    from usage.selectors import quota_limits

    agent = await sync_to_async(make_agent)()
    user = await sync_to_async(make_user)(f"limits-ahead-{quota}")
    if quota:
        await sync_to_async(Quota.objects.create)(user=user, monthly_token_limit=1000,
                                                  monthly_cost_limit=Decimal("7.5"))
        await sync_to_async(Quota.objects.create)(user=user, project="atlas", monthly_token_limit=10)
    holds.clear_limits_cache()
    exchange = await turnstart.begin_turn(user=user, api_key=None, conversation_id=None, agent=agent.slug,
                                          project="atlas", content="hello there", client_id=None, new=False)
    try:
        await exchange.extra["prompt"].side_rows()
        expected = await sync_to_async(quota_limits)(user_id=user.pk, project="atlas")
        assert holds.cached_limits(user.pk, "atlas") == expected and expected.any is quota
        # A project whose limits are cached already is not read again.
        also, _ = turnstart._limits_warmup(user.pk, "atlas")
        assert also == {}
    finally:
        await _finish(exchange)
