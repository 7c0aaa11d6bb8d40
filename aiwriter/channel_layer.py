"""channels_redis's pub/sub layer, except that a socket can still open while Redis is down.

Its new_channel() subscribes the socket's channel at once, so with Redis stopped every new websocket
failed with a 500. Here the channel is named anyway and left unsubscribed; the consumer's receive
(conversations.consumers.ChatConsumer.channel_receive) subscribes it, with backoff, once Redis answers.
A chat needs no channel layer for its own socket; other tabs and cross-process cancel come back with Redis.
Relies on channels_redis 4.3's per-loop layer (`prefix`, `channels`, `_subscribe_to_channel`), pinned.
"""

from __future__ import annotations

import logging
import uuid

from channels_redis.pubsub import RedisPubSubChannelLayer
from redis.exceptions import RedisError

logger = logging.getLogger(__name__)


class ResilientPubSubChannelLayer(RedisPubSubChannelLayer):
    async def new_channel(self, prefix: str = "specific.") -> str:
        layer = self._get_layer()
        channel = f"{layer.prefix}{prefix}{uuid.uuid4().hex}"
        try:
            await layer._subscribe_to_channel(channel)
        except (RedisError, OSError):
            layer.channels.pop(channel, None)  # so that receive() subscribes it when Redis is back
            logger.warning("channel layer unavailable: %s opened unsubscribed", channel)
        return channel
