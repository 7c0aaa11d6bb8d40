"""agents.llm.sse: an upstream's SSE bytes as the data of each event, by the openai SDK's rules."""

from __future__ import annotations

import pytest

from agents.llm import sse


async def _events(*chunks: bytes) -> list[bytes]:
    async def source():
        for chunk in chunks:
            yield chunk

    return [data async for data in sse.events(source())]


async def test_events_split_anywhere_across_reads():
    body = b'data: {"a": 1}\n\ndata: {"b": 2}\n\ndata: [DONE]\n\n'
    whole = await _events(body)
    assert whole == [b'{"a": 1}', b'{"b": 2}', b"[DONE]"]
    for cut in range(1, len(body)):
        assert await _events(body[:cut], body[cut:]) == whole
    assert await _events(*[body[i:i + 1] for i in range(len(body))]) == whole


async def test_crlf_comments_other_fields_and_multiline_data():
    body = b': keep-alive\r\n\r\nevent: message\r\nid: 7\r\ndata:{"a":\r\ndata: 1}\r\n\r\nretry: 5\n\n'
    assert await _events(body) == [b'{"a":\n1}']


async def test_an_event_cut_off_before_its_blank_line_is_dropped():
    assert await _events(b'data: {"a": 1}\n\ndata: {"b"') == [b'{"a": 1}']
    assert await _events(b'data: {"a": 1}\n') == []


def test_decode_wants_a_json_object():
    assert sse.decode(b'{"choices": []}') == {"choices": []}
    for bad in (b"[1, 2]", b"{not json", b"\xff"):
        with pytest.raises(ValueError):
            sse.decode(bad)
