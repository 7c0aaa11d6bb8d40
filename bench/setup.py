"""The bench's world: a throw-away database, Redis keys under their own prefix, the fake upstream and
daphne subprocesses, and seeded users, keys and models. `Context` is what each benchmark receives.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from bench.harness import PY, ROOT, Proc, free_port, run_load, wait_for_port

MAX_CHATS = 1000  # benchmark 3's largest level
CHATS_PER_USER = 3  # MAX_CONCURRENT_CONVERSATIONS' default
# Overridable so two worktrees can bench on one machine without dropping each other's database.
DB_NAME = os.environ.get("BENCH_DB_NAME", "aiw_bench_run")
REDIS_PREFIX = os.environ.get("BENCH_REDIS_PREFIX", DB_NAME)
SERVER_CPUS = {0}
CLIENT_CPUS = {1}  # load generator and fake upstream: away from the server

# Upstream model names on the fake upstream and the knobs each gets.
FAST = "bench-fast"  # zero latency, non-streaming overhead
STREAM = "bench-stream"  # paced chunks: a held-back chunk shows up as a gap
CACHE = "bench-cache"
STREAM_KNOBS = {"chunk_delay": 0.01, "tokens": 20}
WS_AGENT = "bench-agent"


@dataclass
class User:
    id: int
    username: str
    key: str


@dataclass
class Context:
    args: Any
    quick: bool
    deadline: float  # time.monotonic() by which the whole run should be done
    env: dict[str, str]
    log_dir: Path
    upstream_url: str = ""  # ".../v1"
    servers: list[tuple[str, Proc]] = field(default_factory=list)  # (base url, daphne process)
    users: dict[str, User] = field(default_factory=dict)
    chatters: list[User] = field(default_factory=list)  # benchmark 3's users, CHATS_PER_USER chats each
    procs: list[Proc] = field(default_factory=list)
    later: float = 0.0  # seconds the benchmarks still to come need at least (set by bench/run.py)

    # --- targets for the load generator ------------------------------------------------------------
    def direct(self, upstream_model: str = FAST, *, stream: bool = False, content: str = "Hello there",
               **extra: Any) -> dict[str, Any]:
        body = {"model": upstream_model, "messages": [{"role": "user", "content": content}], "stream": stream,
                **extra}
        if stream:
            body["stream_options"] = {"include_usage": True}
        return {"url": f"{self.upstream_url}/chat/completions", "body": body,
                "headers": {"Authorization": "Bearer sk-bench"}}

    def gateway(self, model: str = FAST, *, user: str = "main", server: int = 0, stream: bool = False,
                content: str = "Hello there", **extra: Any) -> dict[str, Any]:
        body = {"model": model, "messages": [{"role": "user", "content": content}], "stream": stream, **extra}
        if stream:
            body["stream_options"] = {"include_usage": True}
        return {"url": f"{self.servers[server][0]}/v1/chat/completions", "body": body,
                "headers": {"Authorization": f"Bearer {self.users[user].key}"}}

    def ws_url(self, server: int = 0) -> str:
        return self.servers[server][0].replace("http://", "ws://") + "/ws/chat/"

    def origin(self, server: int = 0) -> str:
        return self.servers[server][0]

    def load(self, spec: dict[str, Any], timeout: float = 300) -> dict[str, Any]:
        return run_load(spec, self.env, CLIENT_CPUS if self.pinned else None, timeout)

    @property
    def pinned(self) -> bool:
        return bool(self.servers) and self.servers[0][1].pinned

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def allowance(self, want: float) -> float:
        """Seconds this step may take: `want`, less if the benchmarks still to come would not fit."""
        return max(5.0, min(want, self.remaining() - self.later))

    def server_pid(self, server: int = 0) -> int:
        return self.servers[server][1].pid

    # --- fake upstream control ---------------------------------------------------------------------
    def upstream(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        base = self.upstream_url.rsplit("/v1", 1)[0]
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{base}{path}", data=data, method="POST" if data is not None else "GET",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - loopback only
            return json.loads(response.read())

    def upstream_served(self) -> dict[str, int]:
        base = self.upstream_url.rsplit("/v1", 1)[0]
        with urllib.request.urlopen(f"{base}/_control/requests", timeout=30) as response:  # noqa: S310
            data = json.loads(response.read())
        counts: dict[str, int] = {}
        for r in data["requests"]:
            counts[r["model"]] = counts.get(r["model"], 0) + 1
        return counts

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


def bench_env(args: Any) -> dict[str, str]:
    env = dict(os.environ)
    pg = args.pg_url.rstrip("/")
    env.update({
        "DJANGO_SETTINGS_MODULE": args.settings,
        "SECRET_KEY": "bench-only-secret-key-0123456789abcdefghijklmnopqrstuvwxyz",
        "DEBUG": "0",
        "DATABASE_URL": f"{pg}/{DB_NAME}",
        "REDIS_URL": args.redis_url,
        "REDIS_KEY_PREFIX": REDIS_PREFIX,
        "ALLOWED_HOSTS": "127.0.0.1,localhost",
        "SECURE_COOKIES": "0",
        "LOG_LEVEL": "WARNING",
        # Bench 3's chats are CHATS_PER_USER per user; a lease of the previous level still running must not
        # refuse the next level's chat: the per-user cap is not what is measured.
        "MAX_CONCURRENT_CONVERSATIONS": "100000",
        "CONVERSATION_DEDUPE_SECONDS": "0",
        "DEMO_CHUNK_DELAY_SECONDS": "0",
        "PYTHONUNBUFFERED": "1",
    })
    if args.db_pool:
        env["DB_POOL"] = "1"
    else:  # the pool is PostgreSQL's default: --no-db-pool turns it off
        env["DB_POOL"] = "0"
        env.setdefault("DB_CONN_MAX_AGE", "600")
    return env


def create_database(pg_url: str) -> None:
    import psycopg

    with psycopg.connect(f"{pg_url.rstrip('/')}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{DB_NAME}"')


def drop_database(pg_url: str) -> None:
    import psycopg

    with psycopg.connect(f"{pg_url.rstrip('/')}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)')


def clear_redis(redis_url: str) -> int:
    """Deletes this bench's keys only (its own prefix), bounded."""
    import redis

    client = redis.Redis.from_url(redis_url)
    deleted = 0
    for _ in range(1000):
        keys = list(client.scan_iter(match=f"{REDIS_PREFIX}*", count=1000))[:10000]
        if not keys:
            break
        deleted += client.delete(*keys)
    return deleted


def migrate(env: dict[str, str], log_dir: Path) -> None:
    import subprocess

    with open(log_dir / "migrate.log", "wb") as log:
        subprocess.run([PY, "manage.py", "migrate", "--noinput"], cwd=ROOT, env=env, stdout=log,
                       stderr=subprocess.STDOUT, check=True, timeout=300)


def start_upstream(ctx: Context) -> None:
    port = free_port()
    proc = Proc("fake_upstream", [PY, "-m", "devtools.fake_openai", "--port", str(port)], ctx.env, ctx.log_dir,
                cpus=CLIENT_CPUS)
    ctx.procs.append(proc)
    wait_for_port(port, 30, proc.popen)
    ctx.upstream_url = f"http://127.0.0.1:{port}/v1"
    ctx.upstream("/_control/configure", {"model": STREAM, **STREAM_KNOBS})


def start_server(ctx: Context, settings_module: str | None = None) -> None:
    port = free_port()
    n = len(ctx.servers)
    env = {**ctx.env, "DJANGO_SETTINGS_MODULE": settings_module} if settings_module else ctx.env
    args = [PY, "-m", "aiwriter.serve", "-b", "127.0.0.1", "-p", str(port), "aiwriter.asgi:application"]
    proc = Proc(f"daphne{n}", args, env, ctx.log_dir, cpus=SERVER_CPUS)
    ctx.procs.append(proc)
    try:
        wait_for_port(port, 60, proc.popen)
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}\n{proc.tail()}") from None
    ctx.servers.append((f"http://127.0.0.1:{port}", proc))


def seed(ctx: Context) -> None:
    """Users with credit and API keys, and models served by the fake upstream (priced, so charging runs)."""
    from django.contrib.auth import get_user_model
    from django.utils import timezone

    from agents.models import Agent, Deployment, LLMModel, Provider
    from usage.billing.keys import create_api_key
    from usage.models import ModelPrice

    provider = Provider.objects.create(name="bench-upstream", kind=Provider.Kind.OPENAI, base_url=ctx.upstream_url,
                                       api_key="sk-bench", timeout=30, max_retries=0)
    for name in (FAST, STREAM, CACHE):
        model = LLMModel.objects.create(name=name)
        Deployment.objects.create(model=model, provider=provider, upstream_model=name)
        ModelPrice.objects.create(model=model, input_per_million=Decimal("1"), output_per_million=Decimal("2"),
                                  effective_from=timezone.now() - timezone.timedelta(days=400))
    Agent.objects.create(slug=WS_AGENT, name="Bench agent", model=LLMModel.objects.get(name=STREAM),
                         system_prompt="")
    for username in ("main", "small", "big", "stats"):
        user = get_user_model().objects.create_user(username=f"bench-{username}", password="bench-pw-123456")
        _credit(user, Decimal("1000000000"))
        _, raw = create_api_key(user=user, name="bench")
        ctx.users[username] = User(user.pk, user.username, raw)
    # Benchmark 3's 1,000 chats come from many people, as they would: at most CHATS_PER_USER each (the
    # product's per-user cap), so the figure is not one credit account's row taking every charge in turn.
    for i in range(-(-MAX_CHATS // CHATS_PER_USER)):
        user = get_user_model().objects.create_user(username=f"bench-chat-{i}")  # no password: no hashing
        _credit(user, Decimal("1000000"))
        _, raw = create_api_key(user=user, name="bench")
        ctx.chatters.append(User(user.pk, user.username, raw))


def _credit(user: Any, amount: Decimal) -> None:
    from usage.billing.ledger import grant_credits

    grant_credits(user=user, amount=amount, reason="bench", created_by=None)
