"""channels_redis's pub/sub layer, with two changes for many sockets per process.

- **A websocket still opens while Redis is down.** Its new_channel() subscribes the socket's channel at once, so
  with Redis stopped every new websocket failed with a 500. Here the channel is named anyway and left unsubscribed;
  the consumer's receive (conversations.consumers.ChatConsumer.channel_receive) subscribes it, with backoff, once
  Redis answers. A chat needs no channel layer for its own socket; other tabs and cross-process cancel come back
  with Redis.
- **Publishes never queue behind each other.** channels_redis holds one lock per shard around every PUBLISH,
  SUBSCRIBE and UNSUBSCRIBE of the process, so each waited for all earlier ones' round trips: at 1,000 chats a new
  turn's group join queued behind every streaming chat's frames, and turn starts went ~110 per second. Here
  publishes that arrive while one batch is in flight leave together as the next pipeline (one connection, one
  round trip per batch, order kept), and subscribes no longer wait for publishes.

Relies on channels_redis 4.3's per-loop layer (`prefix`, `channels`, `_subscribe_to_channel`, `_shards`), pinned.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

from channels_redis.pubsub import RedisPubSubChannelLayer, RedisPubSubLoopLayer, RedisSingleShardConnection
from channels_redis.utils import _wrap_close, decode_hosts
from redis.exceptions import RedisError

logger = logging.getLogger(__name__)


class BatchingShard(RedisSingleShardConnection):
    """A shard whose publishes are pipelined in batches instead of sent one at a time under the shard's lock."""

    def __init__(self, host: Any, channel_layer: Any) -> None:
        super().__init__(host, channel_layer)
        self._pending: list[tuple[str, bytes, asyncio.Future[None]]] = []
        self._sender: asyncio.Task[None] | None = None

    async def publish(self, channel: str, message: bytes) -> None:
        self._ensure_redis()
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((channel, message, done))
        if self._sender is None:
            self._sender = asyncio.create_task(self._send_pending())
        await done

    async def _send_pending(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    self._ensure_redis()
                    async with self._redis.pipeline(transaction=False) as pipe:
                        for channel, message, _ in batch:
                            pipe.publish(channel, message)
                        await pipe.execute()
                except Exception as exc:  # noqa: BLE001 - Redis down: every publish of the batch fails as it would alone
                    outcome: BaseException | None = exc
                else:
                    outcome = None
                for *_, done in batch:
                    if done.done():
                        continue  # its publisher was cancelled
                    if outcome is None:
                        done.set_result(None)
                    else:
                        done.set_exception(outcome)
        finally:
            self._sender = None

    async def flush(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
            self._sender = None
        for *_, done in self._pending:
            done.cancel()
        self._pending = []
        await super().flush()


class BatchingLoopLayer(RedisPubSubLoopLayer):
    def __init__(self, hosts: Any = None, *args: Any, **kwargs: Any) -> None:
        super().__init__(hosts, *args, **kwargs)
        self._shards = [BatchingShard(host, self) for host in decode_hosts(hosts)]


class ResilientPubSubChannelLayer(RedisPubSubChannelLayer):
    def _get_layer(self) -> RedisPubSubLoopLayer:
        loop = asyncio.get_running_loop()
        layer = self._layers.get(loop)
        if layer is None:
            layer = self._layers[loop] = BatchingLoopLayer(*self._args, **self._kwargs, channel_layer=self)
            _wrap_close(self, loop)
        return layer

    async def new_channel(self, prefix: str = "specific.") -> str:
        layer = self._get_layer()
        channel = f"{layer.prefix}{prefix}{uuid.uuid4().hex}"
        try:
            await layer._subscribe_to_channel(channel)
        except (RedisError, OSError):
            layer.channels.pop(channel, None)  # so that receive() subscribes it when Redis is back
            logger.warning("channel layer unavailable: %s opened unsubscribed", channel)
        return channel
