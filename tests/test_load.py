"""Load: two daphne processes, 100 concurrent websocket chats and 50 concurrent /v1/chat/completions
clients against the test upstream (its own process) for LOAD_SECONDS (30 by default). Loopback only.

Afterwards: no 5xx (the upstream causes none here), no message left in `processing`, every reply stored
once (one assistant reply and one usage record per answered request), every ledger balanced, no balance
below zero, no hold left. Throughput is not asserted (bench/ measures it); correctness under load is.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections import Counter
from decimal import Decimal

import aiohttp
import pytest
import websockets
from django.conf import settings

from agents.models import Provider
from conversations.models import Message
from tests.factories import make_agent, make_api_key, make_model, make_user
from tests.fixtures_faults import unsettled
from usage.billing.ledger import grant_credits
from usage.models import ApiKey, CreditAccount, UsageRecord

pytestmark = [pytest.mark.slow, pytest.mark.pg, pytest.mark.redis, pytest.mark.django_db(transaction=True),
              pytest.mark.timeout(300)]

SECONDS = float(os.environ.get("LOAD_SECONDS", "30"))
WS_CLIENTS = int(os.environ.get("LOAD_WS_CLIENTS", "100"))
V1_CLIENTS = int(os.environ.get("LOAD_V1_CLIENTS", "50"))
REQUEST_TIMEOUT = 120  # per request: a loaded 2-core machine is slow, never wrong


@pytest.fixture
def upstream_process():
    """devtools/fake_openai.py in a process of its own, so its CPU is not the test's; yields its /v1 URL."""
    process = subprocess.Popen([sys.executable, "-m", "devtools.fake_openai", "--port", "0"],
                               cwd=str(settings.BASE_DIR), stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    assert "listening on" in line, line
    yield line.rsplit(" ", 1)[-1].strip()
    process.terminate()
    process.wait(10)


async def _configure(base_url: str, **knobs) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(base_url.removesuffix("/v1") + "/_control/configure", json=knobs) as response:
            assert response.status == 200


async def _ws_client(n: int, ws_url: str, origin: str, raw_key: str, until: float, out: dict) -> None:
    headers = {"Origin": origin, "Authorization": f"Bearer {raw_key}"}
    conversation = None
    async with websockets.connect(ws_url, additional_headers=headers, open_timeout=60, max_size=None) as socket:
        while time.monotonic() < until:
            frame = {"type": "message", "content": f"client {n} says hello", "conversation": conversation}
            if conversation is None:
                frame["agent"] = "loader"
            await socket.send(json.dumps(frame))
            text = []
            async with asyncio.timeout(REQUEST_TIMEOUT):
                while True:
                    got = json.loads(await socket.recv())
                    if got["type"] == "status":
                        conversation = got["conversation"]
                    elif got["type"] == "delta":
                        text.append(got["content"])
                    elif got["type"] in ("done", "error"):
                        break
            if got["type"] == "done":
                out["ws_done"].append((got["message"], "".join(text)))
            else:
                out["ws_errors"].append(got)


async def _v1_client(n: int, base_urls: list[str], raw_key: str, until: float, out: dict) -> None:
    headers = {"Authorization": f"Bearer {raw_key}"}
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:
        i = 0
        while time.monotonic() < until:
            base = base_urls[(n + i) % len(base_urls)]
            stream = bool(i % 2)
            i += 1
            body = {"model": "load-gpt", "stream": stream, "messages": [{"role": "user", "content": f"v1 {n}.{i}"}]}
            async with session.post(base + "/v1/chat/completions", json=body) as response:
                raw = await response.read()
                out["v1_status"][response.status] += 1
                if response.status != 200:
                    out["v1_errors"].append((response.status, raw[:300]))
                elif stream and not raw.rstrip().endswith(b"data: [DONE]"):
                    out["v1_errors"].append(("stream did not finish", raw[-300:]))


async def _drive(processes, ws_keys: list[str], v1_keys: list[str]) -> dict:
    out: dict = {"ws_done": [], "ws_errors": [], "v1_status": Counter(), "v1_errors": []}
    until = time.monotonic() + SECONDS
    clients = [_ws_client(n, processes[n % 2].ws_url, processes[n % 2].base_url, key, until, out)
               for n, key in enumerate(ws_keys)]
    clients += [_v1_client(n, [p.base_url for p in processes], key, until, out) for n, key in enumerate(v1_keys)]
    results = await asyncio.gather(*clients, return_exceptions=True)
    out["crashed"] = [repr(r) for r in results if isinstance(r, BaseException)]
    return out


def _users(prefix: str, n: int) -> list[str]:
    keys = []
    for i in range(n):
        user = make_user(f"{prefix}{i}")
        grant_credits(user=user, amount=Decimal("5"), reason="load test", created_by=None)
        keys.append(make_api_key(user)[1])
    return keys


def test_two_processes_under_100_websocket_chats_and_50_v1_clients(daphne_processes, upstream_process):
    provider = Provider.objects.create(name="load-upstream", kind=Provider.Kind.OPENAI, base_url=upstream_process,
                                       api_key="sk-fake-load")
    model = make_model("load-gpt", provider=provider, input_price="1", output_price="2")
    make_agent("loader", model=model, system_prompt="Be quick.")
    asyncio.run(_configure(upstream_process, model="load-gpt", tokens=20, latency=0.05, chunk_delay=0.005))
    ws_keys, v1_keys = _users("ws", WS_CLIENTS), _users("v1", V1_CLIENTS)
    # daphne refuses a websocket (403) whose handshake takes over 5 s; under this load auth may queue longer.
    args = ("--websocket_connect_timeout", "60")
    processes = [daphne_processes(args, LOG_LEVEL="ERROR"), daphne_processes(args, LOG_LEVEL="ERROR")]
    balances_before = dict(CreditAccount.objects.values_list("user_id", "balance"))

    out = asyncio.run(_drive(processes, ws_keys, v1_keys))

    assert out["crashed"] == [], (out["crashed"][:5], [p.output()[-3000:] for p in processes])
    assert out["ws_errors"] == [], out["ws_errors"][:5]
    assert out["v1_errors"] == [], out["v1_errors"][:5]
    assert not [s for s in out["v1_status"] if s >= 500]
    ws_done, v1_done = len(out["ws_done"]), sum(out["v1_status"].values())
    assert ws_done >= WS_CLIENTS and v1_done >= V1_CLIENTS  # every client got at least one answer

    # Every reply stored once, with the text the client saw.
    ids = [message_id for message_id, _ in out["ws_done"]]
    assert len(set(ids)) == ws_done
    stored = dict(Message.objects.filter(pk__in=ids, status=Message.Status.SUCCESS).values_list("pk", "content"))
    assert stored == dict(out["ws_done"])
    assert Message.objects.filter(role=Message.Role.ASSISTANT).count() == ws_done
    assert UsageRecord.objects.filter(entry_point="ws").count() == ws_done
    assert sorted(UsageRecord.objects.filter(entry_point="ws").values_list("message_id", flat=True)) == sorted(ids)
    v1_key_ids = ApiKey.objects.filter(user__username__startswith="v1").values_list("pk", flat=True)
    assert UsageRecord.objects.filter(entry_point="openai", api_key_id__in=v1_key_ids).count() == v1_done
    assert UsageRecord.objects.filter(charged=True).count() == ws_done + v1_done
    # Nothing unfinished, no hold left, every ledger balanced, no balance below zero, and money moved.
    left = {k: v for k, v in unsettled().items() if v}
    assert left == {}
    assert all(CreditAccount.objects.get(user_id=u).balance < b for u, b in balances_before.items() if b > 0)
