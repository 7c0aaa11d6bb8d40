"""A generation's frames under a slow socket and a slow group: every piece of text, in order, in fewer frames."""

import asyncio

from channels.layers import InMemoryChannelLayer

from conversations.fanout import GroupSender, merge_deltas

GROUP = "chat.conv.7"
REPLY = 21
WORDS = [f"w{n} " for n in range(80)]


class SlowLayer(InMemoryChannelLayer):
    """A channel layer whose every group_send takes 15 ms (a loaded Redis)."""

    sends = 0

    async def group_send(self, group, message):
        self.sends += 1
        await asyncio.sleep(0.015)
        await super().group_send(group, message)


class SlowSocket:
    """The asking socket with a backed-up transport: each send waits 10 ms before it completes."""

    def __init__(self) -> None:
        self.frames: list[dict] = []
        self.sending = False

    async def deliver(self, frame: dict) -> None:
        assert not self.sending  # one frame at a time, as a websocket's sends are
        self.sending = True
        await asyncio.sleep(0.01)
        self.frames.append(frame)
        self.sending = False


async def _stream(sender: GroupSender) -> None:
    """What run_exchange emits: thinking, generating, a delta per chunk (faster than either path), done."""
    await sender.emit({"type": "status", "status": "thinking", "conversation": 7, "message": REPLY})
    await sender.emit({"type": "status", "status": "generating", "conversation": 7, "message": REPLY})
    for n, word in enumerate(WORDS):
        await sender.emit({"type": "delta", "message": REPLY, "content": word})
        if n % 4 == 3:  # chunks arrive in bursts, as several are read from the upstream at once
            await asyncio.sleep(0.002)
    await sender.emit({"type": "done", "message": REPLY, "status": "success"})


def _assert_complete_in_order(frames: list[dict]) -> list[dict]:
    assert [f["status"] for f in frames[:2]] == ["thinking", "generating"]
    assert frames[-1]["type"] == "done"
    deltas = frames[2:-1]
    assert all(f["type"] == "delta" and set(f) == {"type", "message", "content"} and f["message"] == REPLY
               for f in deltas)  # docs/chat.md's delta frame, merged or not
    assert "".join(f["content"] for f in deltas) == "".join(WORDS)  # every piece of text, in order
    return deltas


async def _group_frames(layer: InMemoryChannelLayer, channel: str) -> list[dict]:
    frames: list[dict] = []
    while not frames or frames[-1]["type"] != "done":
        event = await asyncio.wait_for(layer.receive(channel), 5)
        assert event["origin"] == "asking-socket"
        frames.append(event["frame"])
    return frames


async def test_a_slow_socket_and_a_slow_group_each_get_all_the_text_in_order_in_fewer_frames():
    layer = SlowLayer()
    other_tab = await layer.new_channel()
    await layer.group_add(GROUP, other_tab)
    socket = SlowSocket()
    sender = GroupSender(layer, GROUP, origin="asking-socket", deliver=socket.deliver)

    await _stream(sender)
    # The generation never waited on either path: most of the text is still on its way.
    assert len(socket.frames) < len(WORDS) // 2 and layer.sends < len(WORDS) // 2
    await sender.close(timeout=10)

    direct = _assert_complete_in_order(socket.frames)
    assert 1 < len(direct) < len(WORDS)  # what piled up behind a send left as one frame
    grouped = _assert_complete_in_order(await _group_frames(layer, other_tab))
    assert len(grouped) < len(WORDS) // 4  # coalesced into windows, not one PUBLISH per chunk


async def test_a_fast_socket_gets_each_chunk_as_it_comes_and_the_group_gets_windows():
    layer = InMemoryChannelLayer()
    other_tab = await layer.new_channel()
    await layer.group_add(GROUP, other_tab)
    direct: list[dict] = []

    async def deliver(frame: dict) -> None:
        direct.append(frame)

    sender = GroupSender(layer, GROUP, origin="asking-socket", deliver=deliver, window=0.02)
    await sender.emit({"type": "status", "status": "thinking", "conversation": 7, "message": REPLY})
    await sender.emit({"type": "status", "status": "generating", "conversation": 7, "message": REPLY})
    for word in WORDS[:30]:
        await sender.emit({"type": "delta", "message": REPLY, "content": word})
        await asyncio.sleep(0.002)  # the model's pace: the socket keeps up, so nothing is merged for it
    await sender.emit({"type": "done", "message": REPLY, "status": "success"})
    await sender.close(timeout=5)

    assert [f["content"] for f in direct if f["type"] == "delta"] == WORDS[:30]
    grouped = await _group_frames(layer, other_tab)
    assert [f.get("status") for f in grouped[:2]] == ["thinking", "generating"] and grouped[-1]["type"] == "done"
    group_deltas = [f for f in grouped if f["type"] == "delta"]
    assert "".join(f["content"] for f in group_deltas) == "".join(WORDS[:30])
    assert 1 < len(group_deltas) < 30


async def test_chunks_handled_in_one_go_leave_as_one_frame_and_a_lone_chunk_leaves_at_once():
    """Several chunks from one upstream read (a busy server) are one frame; a chunk that comes alone is not held."""
    direct: list[dict] = []

    async def deliver(frame: dict) -> None:
        direct.append(frame)

    sender = GroupSender(InMemoryChannelLayer(), GROUP, origin="asking-socket", deliver=deliver, to_group=False)
    for word in WORDS[:5]:  # one read's chunks: the generation handles them without a pause
        await sender.emit({"type": "delta", "message": REPLY, "content": word})
    await asyncio.sleep(0.005)
    assert direct == [{"type": "delta", "message": REPLY, "content": "".join(WORDS[:5])}]

    await sender.emit({"type": "delta", "message": REPLY, "content": WORDS[5]})
    await asyncio.sleep(0)  # the writer's turn comes at once: nothing waits for more text
    await asyncio.sleep(0)
    assert direct[1:] == [{"type": "delta", "message": REPLY, "content": WORDS[5]}]

    await sender.emit({"type": "done", "message": REPLY, "status": "success"})
    await sender.close(timeout=5)
    assert direct[-1]["type"] == "done" and len(direct) == 3


async def test_without_a_group_the_socket_still_gets_every_frame():
    direct: list[dict] = []

    async def deliver(frame: dict) -> None:
        direct.append(frame)

    sender = GroupSender(None, GROUP, origin="asking-socket", deliver=deliver, to_group=False)
    await _stream(sender)
    await sender.close(timeout=5)
    _assert_complete_in_order(direct)


async def test_a_socket_that_went_away_does_not_stop_the_group():
    layer = InMemoryChannelLayer()
    other_tab = await layer.new_channel()
    await layer.group_add(GROUP, other_tab)

    async def gone(frame: dict) -> None:
        raise ConnectionResetError("socket closed")

    sender = GroupSender(layer, GROUP, origin="asking-socket", deliver=gone, window=0.01)
    await _stream(sender)
    await sender.close(timeout=5)
    _assert_complete_in_order(await _group_frames(layer, other_tab))


def test_merge_joins_runs_of_one_messages_deltas_only():
    frames = [
        {"type": "status", "status": "generating", "conversation": 1, "message": 5},
        {"type": "delta", "message": 5, "content": "a"},
        {"type": "delta", "message": 5, "content": "b"},
        {"type": "delta", "message": 6, "content": "c"},
        {"type": "delta", "message": 6, "content": "d"},
        {"type": "done", "message": 6, "status": "success"},
        {"type": "delta", "message": 6, "content": "e"},
    ]
    assert merge_deltas(frames) == [
        frames[0],
        {"type": "delta", "message": 5, "content": "ab"},
        {"type": "delta", "message": 6, "content": "cd"},
        frames[5],
        frames[6],
    ]
    assert merge_deltas([]) == []


async def test_the_socket_does_not_wait_for_its_join_and_the_group_gets_everything_once_joined():
    layer = SlowLayer()
    other_tab = await layer.new_channel()
    await layer.group_add(GROUP, other_tab)
    joining: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    direct: list[dict] = []

    async def deliver(frame: dict) -> None:
        direct.append(frame)

    sender = GroupSender(layer, GROUP, origin="asking-socket", deliver=deliver, joined=joining)
    await _stream(sender)
    await asyncio.sleep(0.01)  # the socket's writer's turn
    _assert_complete_in_order(direct)  # the whole reply reached the socket while the join was still under way
    assert layer.sends == 0
    joining.set_result(True)
    await sender.close(timeout=5)
    _assert_complete_in_order(await _group_frames(layer, other_tab))


async def test_a_failed_join_sends_nothing_to_the_group_and_everything_to_the_socket():
    layer = SlowLayer()
    joining: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    direct: list[dict] = []

    async def deliver(frame: dict) -> None:
        direct.append(frame)

    sender = GroupSender(layer, GROUP, origin="asking-socket", deliver=deliver, joined=joining)
    await sender.emit({"type": "status", "status": "thinking", "conversation": 7, "message": REPLY})
    joining.set_result(False)  # the channel layer is down
    await asyncio.sleep(0)
    await _stream(sender)
    await sender.close(timeout=5)
    assert layer.sends == 0 and not sender.to_group
    _assert_complete_in_order(direct[1:])
