"""A generation's frames on their way out: to the socket that asked, directly, and to the conversation's group.

- **The asking socket** gets every frame, in order, never through the channel layer, from a writer task of its
  own: the generation only queues. The writer takes what was queued since it last ran, so the chunks the
  generation handled in one go (one read from the upstream: several when the server is busy) leave as one frame,
  the pieces joined, while a chunk that comes alone leaves alone, at once. A slow socket (backpressure) gets what
  piled up behind its send the same way, instead of a queue of one frame per chunk. Fewer frames is less CPU per
  chat where it counts: under load (docs/BENCHMARKS.md).
- **The group** (other tabs, other processes; best effort, pub/sub is at-most-once) gets deltas coalesced
  into windows of GROUP_WINDOW_SECONDS from its own task: one PUBLISH per window instead of one per chunk,
  which also spares every subscribed process a receive and a dispatch per chunk. Other frames follow the
  text before them at once.

Frame shapes are docs/chat.md's: a merged delta is a delta whose content is the pieces joined.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

logger = logging.getLogger(__name__)

Frame = dict[str, Any]
Deliver = Callable[[Frame], Awaitable[None]]

# Long enough to gather several chunks of a stream (models send one every 10-50 ms), short enough that
# another tab does not notice the lag.
GROUP_WINDOW_SECONDS = 0.03
_END = None  # queued last: the path has nothing more to send


def merge_deltas(frames: list[Frame]) -> list[Frame]:
    """The frames in order, each run of deltas of one message joined into one delta (one string join)."""
    merged: list[Frame] = []
    run: list[str] = []
    head: Frame | None = None
    for frame in frames:
        if head is not None and frame["type"] == "delta" and frame["message"] == head["message"]:
            run.append(frame["content"])
            continue
        if head is not None:
            merged.append({**head, "content": "".join(run)} if len(run) > 1 else head)
            head = None
        if frame["type"] == "delta":
            head, run = frame, [frame["content"]]
        else:
            merged.append(frame)
    if head is not None:
        merged.append({**head, "content": "".join(run)} if len(run) > 1 else head)
    return merged


class _Outbox:
    """Frames waiting for one path's writer task; the writer takes them all at once."""

    def __init__(self) -> None:
        self.frames: list[Frame | None] = []
        self.ready = asyncio.Event()

    def put(self, frame: Frame | None) -> None:
        self.frames.append(frame)
        self.ready.set()

    async def take(self) -> tuple[list[Frame], bool]:
        """Everything queued so far (waiting for something), and whether the end marker was among it."""
        await self.ready.wait()
        return self.take_nowait()

    def take_nowait(self) -> tuple[list[Frame], bool]:
        self.ready.clear()
        taken, self.frames = self.frames, []
        if _END in taken:
            return [f for f in taken[:taken.index(_END)] if f is not None], True
        return [f for f in taken if f is not None], False


class GroupSender:
    """Sends a generation's frames to the socket that asked and to its group, in order, without holding it back.

    `emit` only queues; `close` flushes both paths (the group's within `timeout`, then it gives up on it).
    """

    def __init__(self, channel_layer: Any, group: str, *, origin: str, deliver: Deliver, to_group: bool = True,
                 window: float = GROUP_WINDOW_SECONDS, joined: Awaitable[bool] | None = None):
        self.channel_layer = channel_layer
        self.group = group
        self.origin = origin  # the asking socket's channel: it skips its own frames coming back from the group
        self.deliver = deliver
        self.to_group = to_group  # False when the socket could not join the group (channel layer down)
        # The asking socket's join of the group, under way: the group's frames wait for it (and are not sent when
        # it failed: the channel layer is down), the socket's own do not.
        self._joined = joined
        self.window = window
        self._direct = _Outbox()
        self._grouped = _Outbox()
        self._direct_task = asyncio.create_task(self._run_direct())
        self._group_task = asyncio.create_task(self._run_group()) if to_group else None

    async def emit(self, frame: Frame) -> None:
        if self.to_group:
            self._grouped.put(frame)
        self._direct.put(frame)

    async def close(self, timeout: float = 30.0) -> None:
        self._direct.put(_END)
        self._grouped.put(_END)
        for task in (self._direct_task, self._group_task):
            if task is None:
                continue
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout)
            except (TimeoutError, asyncio.CancelledError):
                task.cancel()

    # --- the asking socket --------------------------------------------------------------------------

    async def _run_direct(self) -> None:
        while True:
            frames, ended = await self._direct.take()
            for frame in merge_deltas(frames):
                await self._deliver(frame)
            if ended:
                return

    async def _deliver(self, frame: Frame) -> None:
        try:
            await self.deliver(frame)
        except Exception:  # noqa: BLE001 - the socket went away: the generation goes on and is stored
            logger.warning("frame not delivered to its socket")

    # --- the group ----------------------------------------------------------------------------------

    async def _run_group(self) -> None:
        if self._joined is not None and not await self._joined:
            self.to_group = False  # as if it never had a group: what was queued for it is dropped
            self._grouped.take_nowait()
            return
        while True:
            frames, ended = await self._grouped.take()
            first_delta = next((i for i, f in enumerate(frames) if f["type"] == "delta"), None)
            if first_delta is not None and not ended:
                # Text is flowing: what came before it goes now; the text waits for its window to fill.
                for frame in frames[:first_delta]:
                    await self._send(frame)
                frames = frames[first_delta:]
                await asyncio.sleep(self.window)
                more, ended = self._grouped.take_nowait()
                frames += more
            for frame in merge_deltas(frames):
                await self._send(frame)
            if ended:
                return

    async def _send(self, frame: Frame) -> None:
        try:
            await self.channel_layer.group_send(self.group, {"type": "chat.frame", "frame": frame,
                                                             "origin": self.origin})
        except Exception:  # noqa: BLE001 - a lost frame must not kill the generation; the message is stored
            logger.exception("group_send to %s failed", self.group)
