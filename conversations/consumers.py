"""Websocket chat at /ws/chat/ (frames: docs/chat.md). Thin: parses frames, calls services, relays frames.

Each generation runs in its own task, so the socket keeps receiving (cancel works mid-stream). Its frames
go to the conversation's channel-layer group, so every subscribed socket of the owner — another tab,
another daphne process — sees the same stream.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from channels.consumer import get_handler_name
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings

from aiwriter import parsers as json_body
from aiwriter.errors import ApiError, message_from_detail
from aiwriter.ws_auth import credential_is_live_async
from conversations import admission, services, turnstart
from conversations.fanout import GroupSender
from conversations.generation import error_frame, run_exchange
from conversations.serializers import MessageFrameInput

logger = logging.getLogger(__name__)

CLOSE_UNAUTHENTICATED = 4401
# A frame carries at most one message; JSON escaping can grow text up to 6x (\\uXXXX).
MAX_FRAME_CHARS = settings.MAX_MESSAGE_CHARS * 6 + 4096
# Joining a group right after Redis restarted fails once while its client reconnects.
JOIN_ATTEMPTS = 3
# How long a message sent right after `done` waits for the previous reply's final write.
PREVIOUS_WRITE_WAIT_SECONDS = 10.0


def group_name(conversation_id: int) -> str:
    return f"chat.conv.{conversation_id}"


# Generations running in this process, by conversation. A generation outlives the socket that started it
# (a reload or a closed tab does not stop a reply; only a `cancel` frame does), so a cancel from the
# reconnected socket must find it here rather than on the old consumer.
RUNNING: dict[int, asyncio.Task] = {}


def _cancel_soon(task: asyncio.Task) -> None:
    # A task cancelled before its first step never runs its body (no cleanup, lock kept); a cancel
    # queued behind that first step always lands inside run_exchange's handlers.
    asyncio.get_running_loop().call_soon(_cancel_once, task)


def _cancel_once(task: asyncio.Task) -> None:
    # A second cancel would interrupt the first one's cleanup (storing the reply's final state).
    if not task.done() and not task.cancelling():
        task.cancel()


class BadFrame(ApiError):
    code = "bad_request"
    message = "Malformed frame."


class ChannelLayerUnavailable(ApiError):
    status_code = 503
    code = "service_unavailable"
    message = "Live updates are unavailable right now; try again shortly."
    retryable = True


class ChatConsumer(AsyncWebsocketConsumer):
    async def dispatch(self, message: dict[str, Any]) -> None:
        # Channels' dispatch first closes stale ORM connections with a hop to the process's one sync thread, for
        # every frame and every group message: under load each hop waited for the GIL, and 1,000 sockets' turns
        # started one hop at a time. This consumer's database work runs on the async pool, or in
        # database_sync_to_async, which closes stale connections itself.
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)

    # Channels assigns channel_receive (the channel layer's receive for this socket) before dispatching.
    # Wrapped so that a channel layer that is down (Redis stopped) is retried instead of ending the socket:
    # the socket's own chat never needs the layer (GroupSender delivers to it directly).
    @property
    def channel_receive(self) -> Callable[[], Awaitable[dict[str, Any]]]:
        return self._channel_receive

    @channel_receive.setter
    def channel_receive(self, receive: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        async def resilient_receive() -> dict[str, Any]:
            delay = 0.1
            while True:
                try:
                    return await receive()
                except asyncio.CancelledError:
                    raise
                except Exception:  # noqa: BLE001 - Redis down or restarting: wait, then subscribe again
                    logger.warning("channel layer receive failed; retrying in %.1fs", delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)

        self._channel_receive = resilient_receive

    async def connect(self) -> None:
        self.user = self.scope.get("user")
        self.api_key = self.scope.get("api_key")
        self.generations: dict[int, asyncio.Task] = {}
        self.joined: set[str] = set()
        await self.accept()  # accept first: a close code only reaches the client on an open socket
        if self.user is None or not self.user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)

    async def disconnect(self, code: int) -> None:
        # Decision (docs/chat.md): a disconnect does not stop this socket's generations. They run to the end
        # and are stored; a reopened page reads the text so far and follows the rest through the group.
        for group in list(getattr(self, "joined", ())):
            try:
                await self.channel_layer.group_discard(group, self.channel_name)
            except Exception:  # noqa: BLE001 - the layer is down: its subscriptions went with it
                logger.warning("group_discard of %s failed", group)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if self.user is None or not self.user.is_authenticated:
            return
        try:
            # A key revoked or expired, a user deactivated or logged out since the socket opened: refuse this
            # frame and close, whichever process made the change (docs/chat.md).
            if not await self._credential_holds():
                return
            frame = self._parse(text_data, bytes_data)
            handler = {"message": self._on_message, "cancel": self._on_cancel,
                       "subscribe": self._on_subscribe}.get(frame.get("type"))
            if handler is None:
                raise BadFrame("Unknown frame type; expected message, cancel or subscribe.")
            await handler(frame)
        except ApiError as exc:
            retry_after = str(exc.headers.get("Retry-After", ""))  # e.g. a key's rate limit: seconds to wait
            await self._send_json(error_frame(exc.code, exc.message, exc.retryable, exc.extra.get("message_id"),
                                              retry_after=int(retry_after) if retry_after.isdigit() else None))
        except Exception:  # noqa: BLE001 - e.g. the database is down: tell this frame's sender, keep the socket
            logger.exception("chat frame failed")
            await self._send_json(error_frame("internal_error", "The server could not handle this frame.", True))

    # --- frames from the client -----------------------------------------------------------------

    @staticmethod
    def _parse(text_data: str | None, bytes_data: bytes | None) -> dict[str, Any]:
        if text_data is None:
            raise BadFrame("Frames are JSON text.")
        if len(text_data) > MAX_FRAME_CHARS:
            raise BadFrame(f"Frame too large (at most {MAX_FRAME_CHARS} characters).")
        try:
            frame = json_body.loads(text_data, allow_nul=False)  # NUL or deep nesting: bad_request, not a 500
        except json_body.BadJSON as exc:
            raise BadFrame(str(exc)) from exc
        except ValueError as exc:
            raise BadFrame("Frame is not valid JSON.") from exc
        if not isinstance(frame, dict):
            raise BadFrame("Frame must be a JSON object.")
        return frame

    @staticmethod
    def _conversation_id(frame: dict[str, Any], *, required: bool) -> int | None:
        value = frame.get("conversation")
        if value is None and not required:
            return None
        if isinstance(value, bool) or not isinstance(value, int | str) or not str(value).isdigit():
            raise BadFrame("`conversation` must be a conversation id.")
        return int(value)

    async def _on_message(self, frame: dict[str, Any]) -> None:
        # The REST serializers' fields: the socket and REST refuse the same inputs with the same messages.
        data = MessageFrameInput(data=frame)
        if not data.is_valid():
            raise BadFrame(message_from_detail(data.errors))
        values = data.validated_data
        conversation_id, content, client_id = values.get("conversation"), values["content"], values.get("client_id")
        agent, project, new = values.get("agent"), values.get("project"), values["new"]
        if project is None:
            project = getattr(self.api_key, "project", "") or ""
        previous = self.generations.get(conversation_id) if conversation_id is not None else None
        if previous is not None and getattr(previous, "told", False):
            # Its final frame is out and its final write under way: a message sent right after `done` waits for
            # that write (milliseconds) instead of meeting the old reply's lock.
            await asyncio.wait([previous], timeout=PREVIOUS_WRITE_WAIT_SECONDS)
        async with admission.turn_start():
            exchange = await turnstart.begin_turn(
                user=self.user, api_key=self.api_key, conversation_id=conversation_id, agent=agent, project=project,
                content=content, client_id=client_id, new=new)
        group = group_name(exchange.conversation.pk)
        # The exchange is begun (message stored, lock held): it runs even if the channel layer is unreachable,
        # streaming to this socket alone, so nothing is left half-done. The socket joins the group meanwhile (its
        # own frames never come through it): the reply's frames to the group wait for the join, the first delta
        # to this socket does not.
        joined = asyncio.ensure_future(self._join(group))
        task = asyncio.create_task(self._generate(exchange, group, joined=joined))
        if not exchange.finished:
            self.generations[exchange.conversation.pk] = task
            RUNNING[exchange.conversation.pk] = task

    async def _generate(self, exchange: services.Exchange, group: str, joined: Awaitable[bool]) -> None:
        task = asyncio.current_task()

        async def deliver(frame: dict[str, Any]) -> None:
            if frame.get("type") in ("done", "error"):
                task.told = True  # type: ignore[union-attr]  # the final frame: what remains is the final write
            await self._send_json(frame)

        sender = GroupSender(self.channel_layer, group, origin=self.channel_name, deliver=deliver, joined=joined)
        try:
            await run_exchange(exchange, user=self.user, entry_point="ws", api_key=self.api_key, emit=sender.emit)
        except asyncio.CancelledError:
            pass  # the reply is stored as cancelled and the error frame queued; flush it below
        except Exception:  # noqa: BLE001 - run_exchange stores its own failures; this is a last resort
            logger.exception("generation task failed")
        finally:
            await sender.close()
            if self.generations.get(exchange.conversation.pk) is asyncio.current_task():
                del self.generations[exchange.conversation.pk]
            if RUNNING.get(exchange.conversation.pk) is asyncio.current_task():
                del RUNNING[exchange.conversation.pk]

    async def _on_cancel(self, frame: dict[str, Any]) -> None:
        conversation_id = self._conversation_id(frame, required=True)
        await turnstart.assert_owned(user=self.user, conversation_id=conversation_id)
        self._cancel_local(conversation_id)
        # The generation may run on another socket or process: every socket in the group checks its own.
        try:
            await self.channel_layer.group_send(group_name(conversation_id),
                                                {"type": "chat.cancel", "conversation": conversation_id})
        except Exception:  # noqa: BLE001 - the layer is down: only this socket's own generation can be reached
            logger.warning("cancel of conversation %s not relayed: channel layer unavailable", conversation_id)

    async def _on_subscribe(self, frame: dict[str, Any]) -> None:
        conversation_id = self._conversation_id(frame, required=True)
        await turnstart.assert_owned(user=self.user, conversation_id=conversation_id)
        if not await self._join(group_name(conversation_id)):
            raise ChannelLayerUnavailable()
        await self._send_json({"type": "subscribed", "conversation": conversation_id})

    # --- events from the channel layer ------------------------------------------------------------

    async def chat_frame(self, event: dict[str, Any]) -> None:
        if event.get("origin") == self.channel_name:  # the asking socket had it directly
            return
        if self.user is None:  # closed for a dead credential: frames already queued are not for it
            return
        frame = event["frame"]
        # A subscribed socket that never sends a frame re-checks its credential once per exchange it watches.
        if frame.get("type") == "status" and frame.get("status") == "thinking" and not await self._credential_holds():
            return
        await self._send_json(frame)

    async def chat_cancel(self, event: dict[str, Any]) -> None:
        self._cancel_local(event["conversation"])

    # --- helpers ----------------------------------------------------------------------------------

    async def _credential_holds(self) -> bool:
        """True if the socket's credential is still valid; else tells the client, closes with 4401, False."""
        if await credential_is_live_async(self.user, self.api_key, self.scope.get("session")):
            return True
        self.user = None  # nothing more is done for this socket, even for frames already received
        await self._send_json(error_frame("authentication_failed", "This socket's API key was revoked or has "
                                          "expired, or its session ended; connect again with a valid one.", False))
        await self.close(code=CLOSE_UNAUTHENTICATED)
        return False

    def _cancel_local(self, conversation_id: int) -> None:
        task = self.generations.get(conversation_id) or RUNNING.get(conversation_id)
        if task is not None and not task.done():
            _cancel_soon(task)

    async def _join(self, group: str) -> bool:
        """Subscribes this socket to the group; False when the channel layer stays unreachable."""
        if group in self.joined:
            return True
        for attempt in range(JOIN_ATTEMPTS):
            try:
                await self.channel_layer.group_add(group, self.channel_name)
            except Exception:  # noqa: BLE001 - Redis restarting: its client reconnects on the next command
                logger.warning("group_add of %s failed (attempt %d)", group, attempt + 1)
                await asyncio.sleep(0.05 * (attempt + 1))
                continue
            self.joined.add(group)
            return True
        return False

    async def _send_json(self, frame: dict[str, Any]) -> None:
        await self.send(text_data=json.dumps(frame))
