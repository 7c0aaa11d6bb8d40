import pytest

from agents.llm import service
from agents.llm.types import ChatRequest, ChatResult, TextDelta
from tests.factories import make_model

pytestmark = pytest.mark.django_db(transaction=True)


async def test_demo_streams_in_pieces_with_realistic_usage():
    from asgiref.sync import sync_to_async

    model = await sync_to_async(make_model)("demo-x")
    items = [item async for item in service.stream(ChatRequest(model=model.name, messages=[
        {"role": "user", "content": "Write about autumn"}]))]
    deltas = [i for i in items if isinstance(i, TextDelta)]
    result = items[-1]
    assert isinstance(result, ChatResult) and len(deltas) > 5
    assert result.content == "".join(d.content for d in deltas) and "autumn" in result.content
    assert result.usage.completion_tokens > 10 and result.usage.prompt_tokens > 3
    assert result.usage.source == "measured"
