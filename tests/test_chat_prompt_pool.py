"""A chat turn's prompt build and heartbeat on the async pool (conversations.prompt, memory, hotpath) read and write
what the sync ORM path does.

The same conversation is built twice — through the ORM (`build_prompt`, as on SQLite) and on the pool
(`build_prompt_async`: the cached agent, then memory, history and the key's fallback check in one round trip) —
and must give the same request: history trimmed to the window, the same memory hits in the same order, the same
max_tokens and fallback. The heartbeat's one statement saves the same text and renews the same lease.
"""

from datetime import timedelta

import pytest
from asgiref.sync import sync_to_async
from django.utils import timezone

from aiwriter import dbpool
from conversations import agentcache, hotpath, locks, memory, prompt, services
from conversations.models import Conversation, GenerationLease, Message
from tests.factories import make_agent, make_api_key, make_model, make_user
from usage.models import ApiKey

pytestmark = [pytest.mark.pg, pytest.mark.django_db(transaction=True),
              pytest.mark.usefixtures("close_thread_connections")]


@pytest.fixture(autouse=True)
def _cold_agent_cache():
    agentcache.clear()
    yield
    agentcache.clear()


def _said(owner, agent, texts, *, status="success", deleted=False, role="user"):
    conversation = Conversation.objects.create(owner=owner, agent=agent,
                                               deleted_at=timezone.now() if deleted else None)
    now = timezone.now()
    for n, text in enumerate(texts, start=1):
        message = Message.objects.create(conversation=conversation, role=role, content=text, status=status,
                                         sequence=n)
        # Distinct times, so the order of equal ranks is the same on both paths.
        Message.objects.filter(pk=message.pk).update(created_at=now - timedelta(minutes=len(texts) - n))
    return conversation


def _memory_world():
    model = make_model(context_window=600, max_output_tokens=100)
    agent = make_agent(model=model, system_prompt="You help {user} on {project}.", max_tokens=80)
    alice, bob = make_user(), make_user()
    _said(alice, agent, ["My favourite colour is green", "I live in Lisbon near the river",
                         "Green tea is my favourite drink", "Running a marathon in Berlin was hard",
                         "The river Tagus is wide", "green green green colour"])
    _said(alice, agent, ["my favourite colour was blue"], status="llm_error")  # failed: not memory
    _said(alice, agent, ["deleted favourite colour talk"], deleted=True)  # deleted conversation: not memory
    _said(alice, agent, ["assistant favourite colour"], role="assistant")  # only what the user said
    _said(bob, agent, ["My favourite colour is purple"])  # someone else's
    here = _said(alice, agent, ["favourite colour in this conversation"])  # excluded: the current one
    return alice, agent, here


async def test_memory_search_on_the_pool_finds_the_same_hits_in_the_same_order():
    alice, _, here = await sync_to_async(_memory_world)()
    queries = ["What is my favourite colour?", "running marathons", "river", "the and for", "quantum chromodynamics",
               "green tea OR -colour \"quoted\" drink", "Lisbon river colour favourite green"]
    for query in queries:
        for k in (1, 3, 20):
            by_orm = await sync_to_async(memory.search_memory)(user=alice, query=query, k=k,
                                                              exclude_conversation_id=here.pk)
            statement = memory.search_statement(user_id=alice.pk, query=query, k=k, exclude_conversation_id=here.pk)
            if statement is None:
                assert by_orm == []
                continue
            async with dbpool.connection() as conn:
                rows = await (await conn.execute(*statement)).fetchall()
            assert memory.hits_from_rows(rows) == by_orm, (query, k)
    assert await sync_to_async(memory.search_memory)(user=alice, query="colour", k=20)  # the data does match


def _conversation_with_history(agent, owner, turns: int):
    conversation = Conversation.objects.create(owner=owner, agent=agent, project="atlas")
    sequence = 0
    for n in range(turns):
        for role, status in (("user", "success"), ("assistant", "success")):
            sequence += 1
            Message.objects.create(conversation=conversation, role=role, status=status, sequence=sequence,
                                   content=f"{role} turn {n}: " + "the river is wide and green " * 3)
        if n % 3 == 0:  # a failed exchange stays out of the prompt
            sequence += 1
            Message.objects.create(conversation=conversation, role="user", status="llm_error", sequence=sequence,
                                   content=f"failed question {n}")
    user_message = Message.objects.create(conversation=conversation, role="user", status="processing",
                                          sequence=sequence + 1, content="What was my favourite colour and drink?")
    return conversation, user_message


def _summary(built: prompt.BuiltPrompt) -> dict:
    request = built.request
    return {"messages": request.messages, "model": request.model, "max_tokens": request.max_tokens,
            "fallback_model": request.fallback_model, "temperature": request.temperature,
            "timeout": request.timeout, "prompt_tokens": built.prompt_tokens, "target": built.target.name,
            "target_model": built.target.model.pk,
            "target_fallback": built.target.fallback.pk if built.target.fallback else None}


async def _both(conversation, user_message, user, api_key=None):
    kwargs = dict(conversation=conversation, user_message=user_message, user=user, api_key=api_key)
    by_orm = await sync_to_async(prompt.build_prompt)(**kwargs)
    pool = await dbpool.get_pool()
    before = pool.get_stats().get("requests_num", 0)
    by_pool = await prompt.build_prompt_async(**kwargs)
    assert pool.get_stats().get("requests_num", 0) - before == 1  # one pooled connection, one round trip
    return _summary(by_orm), _summary(by_pool)


@pytest.mark.parametrize("turns", [0, 2, 40])
async def test_both_builds_give_the_same_request(turns):
    alice, agent, _ = await sync_to_async(_memory_world)()
    conversation, user_message = await sync_to_async(_conversation_with_history)(agent, alice, turns)
    by_orm, by_pool = await _both(conversation, user_message, alice)
    assert by_pool == by_orm
    system = by_pool["messages"][0]
    assert system["role"] == "system" and "My favourite colour is green" in system["content"]  # memory hits
    if turns == 40:  # trimmed to the window, oldest out first
        assert not any("turn 0:" in m["content"] for m in by_pool["messages"])
        assert by_pool["messages"][-2]["content"].startswith("assistant turn 39")
    # Again from the agent cache (no agent statement): the same request.
    assert agentcache.get(agent.pk) is not None
    by_orm, by_pool = await _both(conversation, user_message, alice)
    assert by_pool == by_orm


async def test_memory_goes_first_when_the_new_message_barely_fits():
    def world():
        alice, _, _ = _memory_world()
        agent = make_agent(model=make_model(context_window=60, max_output_tokens=20), system_prompt="Be short.")
        return alice, *_conversation_with_history(agent, alice, 3)

    alice, conversation, user_message = await sync_to_async(world)()
    by_orm, by_pool = await _both(conversation, user_message, alice)
    assert by_pool == by_orm and "favourite colour is green" not in by_pool["messages"][0]["content"]


async def test_a_key_limited_to_some_models_loses_the_fallback_on_both_paths():
    def world():
        alice, _, _ = _memory_world()
        primary, fallback = make_model(), make_model()
        agent = make_agent(model=primary, fallback_model=fallback, system_prompt="")
        limited, _ = make_api_key(alice)
        limited.allowed_models.set([primary])
        allowing, _ = make_api_key(alice)
        allowing.allowed_models.set([primary, fallback])
        open_key, _ = make_api_key(alice)
        return alice, agent, limited, allowing, open_key, *_conversation_with_history(agent, alice, 1)

    alice, agent, limited, allowing, open_key, conversation, user_message = await sync_to_async(world)()
    for key, keeps_fallback in ((limited, False), (allowing, True), (open_key, True), (None, True)):
        agentcache.clear()  # cold: the key's check reads the agent's fallback in SQL
        by_orm, by_pool = await _both(conversation, user_message, alice, key)
        assert by_pool == by_orm
        assert (by_pool["fallback_model"] is not None) is keeps_fallback
        by_orm, by_pool = await _both(conversation, user_message, alice, key)  # warm
        assert by_pool == by_orm


async def test_the_agent_cache_is_cleared_when_an_agent_or_model_is_saved():
    alice, agent, _ = await sync_to_async(_memory_world)()
    conversation, user_message = await sync_to_async(_conversation_with_history)(agent, alice, 1)
    await prompt.build_prompt_async(conversation=conversation, user_message=user_message, user=alice)
    cached = agentcache.get(agent.pk)
    assert cached is not None and cached.model.name == agent.model.name
    agent.system_prompt = "Now different."
    await sync_to_async(agent.save)()
    assert agentcache.get(agent.pk) is None
    built = await prompt.build_prompt_async(conversation=conversation, user_message=user_message, user=alice)
    assert built.request.messages[0]["content"].startswith("Now different.")
    model = agent.model
    model.max_output_tokens = 50
    await sync_to_async(model.save)()
    assert agentcache.get(agent.pk) is None


async def test_without_the_pool_the_async_build_is_the_sync_one(settings):
    alice, agent, _ = await sync_to_async(_memory_world)()
    conversation, user_message = await sync_to_async(_conversation_with_history)(agent, alice, 2)
    settings.DB_ASYNC_POOL = False
    kwargs = dict(conversation=conversation, user_message=user_message, user=alice)
    by_sync = await prompt.build_prompt_async(**kwargs)
    assert agentcache.get(agent.pk) is None  # the ORM build: no cache
    assert _summary(by_sync) == _summary(await sync_to_async(prompt.build_prompt)(**kwargs))


async def test_with_no_free_pool_connection_both_steps_take_the_sync_path(settings):
    alice, agent, _ = await sync_to_async(_memory_world)()
    conversation, user_message = await sync_to_async(_conversation_with_history)(agent, alice, 2)
    exchange = await sync_to_async(_exchange)("busy")
    settings.DB_ASYNC_POOL_MAX, settings.DB_ASYNC_POOL_TIMEOUT = 1, 0.05
    kwargs = dict(conversation=conversation, user_message=user_message, user=alice)
    try:
        async with dbpool.connection():  # the loop's only connection, taken
            built = await prompt.build_prompt_async(**kwargs)
            await hotpath.checkpoint(exchange, "Still here")
        assert (await dbpool.get_pool()).get_stats()["requests_errors"] == 2
        assert _summary(built) == _summary(await sync_to_async(prompt.build_prompt)(**kwargs))
        assert (await sync_to_async(_saved)(exchange))[:2] == ("processing", "Still here")
    finally:
        await hotpath.release_lock(exchange)



def _turn_world(turns: int):
    """The memory world, an agent with a fallback model, a key limited to its primary model, and a conversation
    with `turns` exchanges of history (no message of the turn yet)."""
    alice, agent, _ = _memory_world()
    agent.fallback_model = make_model()
    agent.save()
    limited, _ = make_api_key(alice)
    assert isinstance(limited, ApiKey)
    limited.allowed_models.set([agent.model])
    conversation, last = _conversation_with_history(agent, alice, turns)
    last.delete()
    Conversation.objects.filter(pk=conversation.pk).update(message_count=conversation.messages.count())
    return alice, agent, limited, conversation


@pytest.mark.redis
@pytest.mark.parametrize("turns", [0, 5])
@pytest.mark.parametrize("keyed", [False, True])
@pytest.mark.parametrize("new_conversation", [False, True])
async def test_a_websocket_turn_reads_its_prompt_while_it_begins(turns, keyed, new_conversation):
    """turnstart.begin_turn reads the memory, the key's fallback check and the history ahead: the build then reads
    nothing more, and gives what the ORM build gives for the stored messages."""
    from conversations import turnstart

    alice, agent, limited, conversation = await sync_to_async(_turn_world)(turns)
    api_key = limited if keyed else None
    frame = (dict(conversation_id=None, agent=agent.slug, project="elsewhere") if new_conversation
             else dict(conversation_id=conversation.pk, agent=None, project="atlas"))
    exchange = await turnstart.begin_turn(user=alice, api_key=api_key, content="What was my favourite colour?",
                                          client_id=None, new=new_conversation, **frame)
    try:
        assert exchange.extra["prompt"].history is not None
        pool = await dbpool.get_pool()
        before = pool.get_stats().get("requests_num", 0)
        kwargs = dict(conversation=exchange.conversation, user_message=exchange.user_message, user=alice,
                      api_key=api_key)
        by_pool = await prompt.build_prompt_async(**kwargs, prefetched=exchange.extra["prompt"])
        assert pool.get_stats().get("requests_num", 0) - before == 0  # all read while the turn began
        by_orm = await sync_to_async(prompt.build_prompt)(**kwargs)
        assert _summary(by_pool) == _summary(by_orm)
        assert "My favourite colour is green" in by_pool.request.messages[0]["content"]  # memory hits
        assert (by_pool.request.fallback_model is None) is keyed  # the limited key loses the fallback
        if turns and not new_conversation:
            assert by_pool.request.messages[-2]["content"].startswith("assistant turn 4")
    finally:
        await hotpath.finish_reply(exchange, status="success", content="Green.")
        await hotpath.release_lock(exchange)

# --- the heartbeat ----------------------------------------------------------------------------------------------

def _exchange(name: str) -> services.Exchange:
    user = make_user(name)
    conversation = Conversation.objects.create(owner=user, agent=make_agent(model=make_model()))
    return services.begin_exchange(user=user, conversation=conversation, content="hello there")


def _saved(exchange: services.Exchange) -> tuple[str, str, object]:
    reply = Message.objects.get(pk=exchange.reply.pk)
    return reply.status, reply.content, reply.updated_at


@pytest.mark.parametrize("backend", ["redis", "db"])
async def test_the_heartbeat_saves_the_text_and_renews_the_lease_in_one_statement(backend, settings, request):
    if backend == "db":  # the lease row (Redis unset or down)
        request.getfixturevalue("no_redis")
    exchange = await sync_to_async(_exchange)("beater")
    try:
        assert exchange.lock.backend == backend
        if backend == "db":
            await sync_to_async(GenerationLease.objects.filter(conversation_id=exchange.conversation.pk).update)(
                expires_at=timezone.now() + timedelta(seconds=1))
        _, _, touched = await sync_to_async(_saved)(exchange)
        pool = await dbpool.get_pool()
        before = pool.get_stats().get("requests_num", 0)
        await hotpath.checkpoint(exchange, "The sea is")
        assert pool.get_stats().get("requests_num", 0) - before == 1
        status, content, updated_at = await sync_to_async(_saved)(exchange)
        assert (status, content) == ("processing", "The sea is") and updated_at > touched
        if backend == "db":
            lease = await sync_to_async(GenerationLease.objects.get)(conversation_id=exchange.conversation.pk)
            assert lease.expires_at > timezone.now() + timedelta(seconds=settings.CONVERSATION_LOCK_SECONDS - 5)
        else:
            from aiwriter.redis import get_redis

            lock_key, _ = locks._keys(exchange.lock.owner_id, exchange.lock.conversation_id)
            ttl = await sync_to_async(get_redis().pttl)(lock_key)
            assert ttl > (settings.CONVERSATION_LOCK_SECONDS - 5) * 1000

        # The sync heartbeat on an identical reply writes the same text.
        other = await sync_to_async(_exchange)("syncbeater")
        try:
            await sync_to_async(services.checkpoint)(other, "The sea is")
            assert (await sync_to_async(_saved)(other))[:2] == (status, content)
        finally:
            await sync_to_async(services.release_lock)(other)

        # A reply in its final state keeps it: a late beat changes nothing.
        await hotpath.finish_reply(exchange, status="success", content="The sea is wide.")
        await hotpath.checkpoint(exchange, "The sea")
        assert (await sync_to_async(_saved)(exchange))[:2] == ("success", "The sea is wide.")
    finally:
        await hotpath.release_lock(exchange)

