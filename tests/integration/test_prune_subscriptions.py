"""app/chat/resync.py prune_subscriptions against channels_redis' PubSub layer and a real Redis.

It reads the library's private state (there is no API for it), so this pins
the behaviour it relies on: a group discarded while Redis is down stays
subscribed once Redis is back (redis-py re-subscribes what it still holds),
and prune_subscriptions drops exactly the subscriptions nobody uses.
"""
import asyncio
import time

import pytest
import redis as redis_py

from app.chat.layer import ChatPubSubChannelLayer
from app.chat.resync import prune_subscriptions
from tests.harness.services import RedisServer

pytestmark = pytest.mark.integration

GONE, KEPT = b"asgi__group__gone", b"asgi__group__kept"


async def subscribed(client, name, timeout=10.0, want=True) -> bool:
    """Whether Redis lists `name` (or, with want=False, no longer does) within `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (name in client.pubsub_channels()) == want:
            return True
        await asyncio.sleep(0.1)
    return False


async def test_a_group_discarded_while_redis_was_down_is_pruned_and_only_it():
    server = RedisServer().start()
    layer = ChatPubSubChannelLayer(hosts=[{"address": server.url, "socket_timeout": 3.0}])
    client = redis_py.Redis(host="127.0.0.1", port=server.port)
    try:
        gone, kept = await layer.new_channel(), await layer.new_channel()
        await layer.group_add("gone", gone)
        await layer.group_add("kept", kept)
        assert {GONE, KEPT} <= set(client.pubsub_channels())
        server.stop()
        await layer.group_discard("gone", gone)  # the last member leaves while Redis is down
        server.start()
        # The library behaviour: the reconnect subscribes it again, although nobody is in it.
        assert await subscribed(client, GONE), client.pubsub_channels()
        assert await subscribed(client, KEPT)

        assert await prune_subscriptions(layer) == 1
        # UNSUBSCRIBE is written, not answered, when prune returns: Redis may read it a moment later.
        assert await subscribed(client, GONE, want=False), client.pubsub_channels()
        channels = set(client.pubsub_channels())
        assert KEPT in channels, channels  # positive control: a group in use stays
        # So does the worker's inbox, the one subscription behind every socket's own channel.
        inbox = layer._get_layer().inbox
        assert inbox.encode() in channels, channels
        await asyncio.sleep(1.0)  # the receive loop reads Redis' confirmation of the unsubscribe
        assert await prune_subscriptions(layer) == 0
        await layer.send(gone, {"type": "x"})  # a socket's channel still reaches it
        assert (await asyncio.wait_for(layer.receive(gone), 5)) == {"type": "x"}
    finally:
        await layer.flush()
        client.close()
        server.stop()
