"""One openai client per provider per event loop; an edited provider gets a fresh one."""

import pytest
from asgiref.sync import sync_to_async

from agents.llm import clients, registry, service
from agents.llm.types import ChatRequest
from tests.factories import make_fake_model

pytestmark = pytest.mark.django_db(transaction=True)


async def test_client_is_reused_across_calls_and_replaced_after_an_edit(fake_upstream):
    model = await sync_to_async(make_fake_model)(fake_upstream, "cl", upstream_model="cl")
    route = await registry.get_route("cl")
    first = clients.adapter_for(route.deployments[0])
    for _ in range(3):
        await service.complete(ChatRequest(model="cl", messages=[{"role": "user", "content": "x"}]))
    assert clients.adapter_for((await registry.get_route("cl")).deployments[0]) is first

    provider = await sync_to_async(lambda: model.deployments.first().provider)()
    provider.api_key = "sk-rotated"
    await sync_to_async(provider.save)()  # the save clears the route cache in this process
    await service.complete(ChatRequest(model="cl", messages=[{"role": "user", "content": "x"}]))
    assert fake_upstream.requests[-1]["authorization"] == "Bearer sk-rotated"
    assert clients.adapter_for((await registry.get_route("cl")).deployments[0]) is not first
