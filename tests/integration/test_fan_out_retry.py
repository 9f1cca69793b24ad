"""The first message after a Redis restart reaches the room (app/chat/fan_out.py).

Pins the library behaviour the retry exists for: channels_redis' PubSub layer
publishes on a pooled redis-py connection, and after Redis restarts the first
command on that connection fails with "Connection closed by server". Seen in
the fault suite as the first message sent through a worker after a restart
reaching nobody but its sender (until a periodic resync, if one runs).
"""
import asyncio

import pytest
import redis.exceptions

from app.chat.fan_out import fan_out
from app.chat.layer import ChatPubSubChannelLayer
from tests.harness.services import RedisServer

pytestmark = pytest.mark.integration


@pytest.fixture
async def restarted():
    """A layer with one channel in group "room", used once, then Redis restarted
    on the same port (a private server: the session's Redis stays up)."""
    server = RedisServer().start()
    layer = ChatPubSubChannelLayer(hosts=[{"address": server.url, "socket_timeout": 3.0}])
    try:
        channel = await layer.new_channel()
        await layer.group_add("room", channel)
        await layer.group_send("room", {"type": "chat.message", "id": 0})
        assert (await asyncio.wait_for(layer.receive(channel), 5))["id"] == 0
        server.stop()
        server.start()
        await asyncio.sleep(1.5)  # the subscriber reconnects (its receive loop retries every second)
        yield layer, channel
    finally:
        await layer.flush()
        server.stop()


async def test_the_first_publish_on_a_pooled_connection_after_a_restart_fails(restarted):
    """The library behaviour (negative control): one attempt loses the message."""
    layer, channel = restarted
    with pytest.raises(redis.exceptions.ConnectionError):
        await fan_out(layer, "room", {"type": "chat.message", "id": 1}, attempts=1)


async def test_fan_out_reaches_the_group_with_the_first_message_after_a_restart(restarted):
    layer, channel = restarted
    await fan_out(layer, "room", {"type": "chat.message", "id": 1})
    assert (await asyncio.wait_for(layer.receive(channel), 5))["id"] == 1
