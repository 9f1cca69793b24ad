"""app/chat/layer.py against channels_redis and a real Redis.

The layer subclasses the library's PubSub internals (the per-shard receive
callback and publish), so this pins what it relies on: a group message is
offered once to each local socket that registered and queued for the others;
an offer that declines falls back to the queue; and a publish does not wait
for the shard's lock, which the library's own publish does (negative control).
Two layer objects in one event loop stand for two workers.
"""
import asyncio

import pytest
from channels_redis.pubsub import RedisPubSubChannelLayer

from app.chat import layer as chat_layer
from app.chat.layer import ChatPubSubChannelLayer
from tests.harness.services import RedisServer

pytestmark = pytest.mark.integration


@pytest.fixture
def redis_url():
    server = RedisServer().start()
    yield server.url
    server.stop()


def hosts(url):
    return [{"address": url, "socket_timeout": 3.0}]


async def settle(condition, timeout=5.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_a_group_message_is_offered_once_per_registered_socket_and_queued_for_the_others(redis_url):
    worker_a, worker_b = ChatPubSubChannelLayer(hosts=hosts(redis_url)), ChatPubSubChannelLayer(hosts=hosts(redis_url))
    offered = {}
    try:
        direct_a, queued_a, direct_b = (await worker_a.new_channel(), await worker_a.new_channel(),
                                        await worker_b.new_channel())
        for worker, channel in ((worker_a, direct_a), (worker_a, queued_a), (worker_b, direct_b)):
            await worker.group_add("room", channel)
        for channel in (direct_a, direct_b):
            chat_layer.register(channel, lambda event, channel=channel: offered.setdefault(channel, []).append(event) or True)

        await worker_b.group_send("room", {"type": "chat.message", "seq": 1})

        assert (await asyncio.wait_for(worker_a.receive(queued_a), 5)) == {"type": "chat.message", "seq": 1}
        await settle(lambda: len(offered) == 2)
        await asyncio.sleep(0.3)  # a second copy would arrive by now
        assert offered == {direct_a: [{"type": "chat.message", "seq": 1}], direct_b: [{"type": "chat.message", "seq": 1}]}
        # Nothing was queued for the sockets that took it: no dispatch-loop turn.
        assert worker_a._get_layer().channels[direct_a].empty()
        assert worker_b._get_layer().channels[direct_b].empty()
    finally:
        for channel in list(offered):
            chat_layer.unregister(channel)
        await worker_a.flush()
        await worker_b.flush()


async def test_an_offer_that_declines_leaves_the_message_to_the_queue(redis_url):
    worker = ChatPubSubChannelLayer(hosts=hosts(redis_url))
    declined = []
    try:
        channel = await worker.new_channel()
        await worker.group_add("room", channel)
        chat_layer.register(channel, lambda event: declined.append(event) and False)
        await worker.group_send("room", {"type": "chat.revoke", "user": 7})
        assert (await asyncio.wait_for(worker.receive(channel), 5)) == {"type": "chat.revoke", "user": 7}
        assert declined == [{"type": "chat.revoke", "user": 7}]
        # Sending to the channel itself (not a group) is never offered.
        await worker.send(channel, {"type": "x"})
        assert (await asyncio.wait_for(worker.receive(channel), 5)) == {"type": "x"}
        assert len(declined) == 1
    finally:
        chat_layer.unregister(channel)
        await worker.flush()


@pytest.mark.parametrize("backend, waits", [(ChatPubSubChannelLayer, False), (RedisPubSubChannelLayer, True)])
async def test_a_publish_does_not_wait_for_the_shard_lock(redis_url, backend, waits):
    """The shard lock is held while a subscribe waits for a busy Redis (or a
    loop turn): the library's publish queues behind it (negative control), ours does not."""
    worker = backend(hosts=hosts(redis_url))
    try:
        channel = await worker.new_channel()
        await worker.group_add("room", channel)
        shard = worker._get_layer()._shards[0]
        async with shard._lock:
            publishing = asyncio.ensure_future(worker.group_send("room", {"type": "x"}))
            done, _ = await asyncio.wait([publishing], timeout=1.0)
            assert bool(done) is not waits
        await asyncio.wait_for(publishing, 5)
        assert (await asyncio.wait_for(worker.receive(channel), 5)) == {"type": "x"}
    finally:
        await worker.flush()


async def test_a_burst_of_publishes_opens_a_bounded_number_of_connections(redis_url):
    """redis-py opens a connection per concurrent command and keeps it; a burst
    of 200 publishes goes in pipelines on one connection (and every one arrives)."""
    import redis as redis_py

    from app.chat.layer import MAX_PIPELINE

    worker = ChatPubSubChannelLayer(hosts=hosts(redis_url))
    admin = redis_py.Redis.from_url(redis_url)
    try:
        channel = await worker.new_channel()
        await worker.group_add("room", channel)
        before = admin.info("clients")["connected_clients"]
        await asyncio.gather(*(worker.group_send("room", {"type": "x", "n": n}) for n in range(200)))
        opened = admin.info("clients")["connected_clients"] - before
        assert opened == 1, opened
        assert MAX_PIPELINE >= 200
        got = {(await asyncio.wait_for(worker.receive(channel), 5))["n"] for _ in range(200)}
        assert got == set(range(200))
    finally:
        admin.close()
        await worker.flush()


async def test_an_offer_that_raises_costs_nobody_else_the_message(redis_url, caplog):
    """Positive control beside it: the healthy socket's offer takes the message;
    the broken one's message falls back to its queue, and the receive loop goes on."""
    worker = ChatPubSubChannelLayer(hosts=hosts(redis_url))
    taken = []
    try:
        broken, healthy = await worker.new_channel(), await worker.new_channel()
        for channel in (broken, healthy):
            await worker.group_add("room", channel)
        chat_layer.register(broken, lambda event: 1 / 0)
        chat_layer.register(healthy, lambda event: taken.append(event) or True)
        await worker.group_send("room", {"type": "chat.message", "seq": 1})
        assert (await asyncio.wait_for(worker.receive(broken), 5)) == {"type": "chat.message", "seq": 1}
        await settle(lambda: taken)
        await worker.group_send("room", {"type": "chat.message", "seq": 2})
        await settle(lambda: len(taken) == 2, timeout=0.8)  # no 1 s pause of the receive loop
        assert "offer of" in caplog.text
    finally:
        chat_layer.unregister(broken)
        chat_layer.unregister(healthy)
        await worker.flush()


def test_redis_replies_are_parsed_by_hiredis():
    """hiredis (requirements.in) is redis-py's parser when it is installed:
    every reply the layer, the limits and the sessions read is parsed in C.
    Without it the Python parser cost about a sixth of a worker's event-loop
    CPU at 10,000 deliveries/s (bench/README.md "Redis replies"). The tests
    above run on it, against a real Redis."""
    import redis.asyncio.connection
    from redis._parsers import _AsyncHiredisParser

    assert redis.asyncio.connection.DefaultParser is _AsyncHiredisParser


@pytest.mark.parametrize("backend, per_socket", [(ChatPubSubChannelLayer, False), (RedisPubSubChannelLayer, True)])
async def test_sockets_channels_cost_no_redis_subscription_each(redis_url, backend, per_socket):
    """A socket's own channel is process-local (`<inbox>!<id>`): 30 of them
    make one Redis subscription, the worker's inbox, and closing them sends
    nothing; the library's layer subscribes to each (negative control)."""
    import redis as redis_py

    worker = backend(hosts=hosts(redis_url))
    admin = redis_py.Redis.from_url(redis_url)
    try:
        channels = [await worker.new_channel() for _ in range(30)]
        await settle(lambda: len(admin.pubsub_channels()) == (30 if per_socket else 1))
        assert all(("!" in name) is not per_socket for name in channels)
        before = admin.info("commandstats").get("cmdstat_unsubscribe", {}).get("calls", 0)
        readers = [asyncio.ensure_future(worker.receive(name)) for name in channels]
        await asyncio.sleep(0.05)
        for reader in readers:  # how Channels ends a consumer's channel
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        await asyncio.sleep(0.3)
        unsubscribed = admin.info("commandstats").get("cmdstat_unsubscribe", {}).get("calls", 0) - before
        assert (unsubscribed > 0) is per_socket, unsubscribed
        assert not worker._get_layer().channels  # every queue dropped
    finally:
        admin.close()
        await worker.flush()


async def test_send_reaches_a_socket_of_another_worker_through_its_inbox(redis_url):
    """`send(channel)` from any code, any process: worker B sends to two
    sockets of worker A; each gets its own message, in order, and a send to a
    socket that has closed is dropped without disturbing the others."""
    worker_a, worker_b = ChatPubSubChannelLayer(hosts=hosts(redis_url)), ChatPubSubChannelLayer(hosts=hosts(redis_url))
    try:
        first, second, gone = (await worker_a.new_channel(), await worker_a.new_channel(),
                               await worker_a.new_channel())
        assert first.startswith(worker_a._get_layer().inbox) and not first.startswith(worker_b._get_layer().inbox)
        reader = asyncio.ensure_future(worker_a.receive(gone))
        await asyncio.sleep(0.05)
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        for n in range(3):
            await worker_b.send(gone, {"type": "x", "n": -1})
            await worker_b.send(first, {"type": "x", "n": n, "to": "first"})
            await worker_b.send(second, {"type": "x", "n": n, "to": "second"})
        for name, to in ((first, "first"), (second, "second")):
            got = [await asyncio.wait_for(worker_a.receive(name), 5) for _ in range(3)]
            assert got == [{"type": "x", "n": n, "to": to} for n in range(3)]
        # After a flush (connections closed, subscriptions forgotten) a new socket subscribes the inbox again.
        await worker_a.flush()
        again = await worker_a.new_channel()
        await worker_b.send(again, {"type": "x", "n": 9})
        assert (await asyncio.wait_for(worker_a.receive(again), 5)) == {"type": "x", "n": 9}
    finally:
        await worker_a.flush()
        await worker_b.flush()
