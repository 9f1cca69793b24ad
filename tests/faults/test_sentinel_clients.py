"""Each Redis client of the app follows a Sentinel failover (real primary,
replica and three sentinels on 127.0.0.1), and the library behaviour
app/redis_config.py relies on is pinned here:

* Django's RedisCache with `pool_class` = SentinelCachePool (django-axes' counts);
* the rate limits (app/chat/throttle.py): refuse while no primary answers
  (fail safe), count on the promoted one after;
* SentinelBlockingPool: redis-py's Sentinel pool combined with its blocking
  pool waits for a free connection (the plain Sentinel pool refuses);
* channels_redis (both layers) with the Sentinel host dict: messages flow
  after the failover, and `redis_connect_func` sees the reconnect that
  triggers the resync (app/chat/resync.py).
"""
from __future__ import annotations

import asyncio
import time

import pytest

from app.redis_config import RedisTarget, SentinelBlockingPool
from tests.harness.services import SentinelRedis

pytestmark = pytest.mark.integration


@pytest.fixture
def cluster():
    c = SentinelRedis(down_after_ms=1000).start()
    yield c
    c.stop()


def target_of(c: SentinelRedis) -> RedisTarget:
    return RedisTarget(sentinels=tuple(("127.0.0.1", s.port) for s in c.sentinels), master=c.master,
                       password=c.password, sentinel_password=c.sentinel_password)


def fail_over(c: SentinelRedis, timeout=30.0) -> int:
    old = c.primary()
    old.kill()
    c.wait(lambda: c.primary_port() not in (None, old.port), timeout, "the sentinels promoted the replica")
    return c.primary_port()


def test_django_cache_follows_the_failover(cluster):
    from django.core.cache.backends.redis import RedisCache

    config = target_of(cluster).cache(key_prefix="chat", timeout=2)
    cache = RedisCache(config["LOCATION"], {"OPTIONS": config["OPTIONS"], "KEY_PREFIX": "chat"})
    cache.set("before", 1, 60)
    assert cache.get("before") == 1
    with cluster.primary().client() as r:
        assert r.exists("chat:1:before")  # written to the primary the sentinels name
        # Replication is asynchronous: under load the replica can be a write
        # behind when the primary is killed. WAIT until it has acknowledged it.
        assert r.wait(1, 5000) >= 1, "the replica did not acknowledge the write"
    new_port = fail_over(cluster)
    deadline = time.monotonic() + 10
    while True:  # the first command after the kill may still meet the dead connection
        try:
            cache.set("after", 2, 60)
            break
        except Exception:
            assert time.monotonic() < deadline, "the cache never reached the promoted primary"
            time.sleep(0.2)
    assert cache.get("after") == 2 and cache.get("before") == 1  # replicated before the kill
    with cluster.primary().client() as r:
        assert cluster.primary().port == new_port and r.exists("chat:1:after")


def test_rate_limits_refuse_without_a_primary_and_count_on_the_new_one(cluster, settings):
    from app.chat import throttle

    settings.CHAT_LIMITS_REDIS_URL = None
    settings.CHAT_LIMITS_REDIS_SENTINEL = target_of(cluster)
    throttle._clients.clear()
    limit = throttle.Limit("sentinel-test", 3, 60)
    assert [throttle.hit(limit, "a").allowed for _ in range(4)] == [True, True, True, False]
    old = cluster.primary()
    old.kill()
    with pytest.raises(throttle.Unavailable):  # no primary yet: refuse, never "allow everything"
        throttle.hit(limit, "b")
    cluster.wait(lambda: cluster.primary_port() not in (None, old.port), 30, "failover")
    deadline = time.monotonic() + 10
    while True:
        try:
            verdicts = [throttle.hit(limit, "b").allowed for _ in range(4)]
            break
        except throttle.Unavailable:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    assert verdicts == [True, True, True, False]  # counted on the promoted primary

    async def async_hits():
        return [(await throttle.ahit(limit, "c")).allowed for _ in range(4)]

    assert asyncio.run(async_hits()) == [True, True, True, False]
    throttle._clients.clear()


def test_sentinel_blocking_pool_waits_where_the_plain_sentinel_pool_refuses(cluster):
    from redis.asyncio import Redis
    from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
    from redis.exceptions import ConnectionError

    target = target_of(cluster)

    async def six_blpops(client):
        try:
            return await asyncio.gather(*(client.blpop([f"nothing-{n}"], 0.3) for n in range(6)),
                                        return_exceptions=True)
        finally:
            await client.aclose()

    # What the rate limits use (app/redis_config.py: SentinelBlockingPool): each waits its turn.
    assert isinstance(target.async_client(max_connections=2, timeout=5).connection_pool, SentinelBlockingPool)
    assert asyncio.run(six_blpops(target.async_client(max_connections=2, timeout=5))) == [None] * 6
    # Control: redis-py's plain Sentinel pool of the same size refuses the third.
    sentinel = Sentinel(list(target.sentinels), sentinel_kwargs=target.sentinel_options())
    plain = SentinelConnectionPool(target.master, sentinel, max_connections=2, **target.server_options())
    outcome = asyncio.run(six_blpops(Redis(connection_pool=plain)))
    assert any(isinstance(o, ConnectionError) and "Too many connections" in str(o) for o in outcome), outcome


@pytest.mark.parametrize("backend", ["app.chat.layer.ChatPubSubChannelLayer", "channels_redis.pubsub.RedisPubSubChannelLayer",
                                     "channels_redis.core.RedisChannelLayer"])
def test_channel_layer_follows_the_failover_and_reports_the_reconnect(cluster, backend):
    from django.utils.module_loading import import_string

    connects = []

    async def on_connect(connection):
        await connection.on_connect()
        connects.append((id(connection), connection.port))

    kind = "core" if backend.endswith("RedisChannelLayer") else "pubsub"
    layer = import_string(backend)(hosts=[target_of(cluster).channel_layer_host(kind, redis_connect_func=on_connect)])

    async def scenario():
        channel = await layer.new_channel("sentinel.")
        await layer.send(channel, {"type": "x", "n": 1})
        assert (await asyncio.wait_for(layer.receive(channel), 5))["n"] == 1
        old_port = cluster.primary().port
        new_port = await asyncio.to_thread(fail_over, cluster)
        # One receive, never cancelled (a cancelled receive unsubscribes the
        # channel); like the consumer, a send that fails is simply tried again.
        receiving = asyncio.ensure_future(layer.receive(channel))
        deadline = time.monotonic() + 15
        while not receiving.done():
            try:
                await layer.send(channel, {"type": "x", "n": 2})
            except Exception:
                pass
            await asyncio.wait([receiving], timeout=0.5)
            assert time.monotonic() < deadline, "no message through the layer after the failover"
        assert receiving.result()["n"] == 2
        await layer.flush()
        return old_port, new_port

    old_port, new_port = asyncio.run(scenario())
    assert {port for _, port in connects} >= {old_port, new_port}
    first_ids = {cid for cid, port in connects if port == old_port}
    # A connection object that was connected to the old primary connected
    # again, to the new one: what app/chat/resync.py's on_redis_connect counts.
    assert any(cid in first_ids for cid, port in connects if port == new_port), connects


def test_a_subscription_leaves_a_frozen_primary_by_itself(cluster):
    """FollowPrimaryConnection: a layer that only subscribes (no publish of its
    own would make its pool reconnect) moves its subscription off a frozen
    primary once the sentinels name another: a message published straight to
    the promoted primary arrives."""
    import os
    import signal

    import redis.asyncio
    from channels_redis.pubsub import RedisPubSubChannelLayer

    target = target_of(cluster)
    layer = RedisPubSubChannelLayer(hosts=[target.channel_layer_host("pubsub")])
    frozen = cluster.primary()

    async def scenario():
        channel = await layer.new_channel("frozen.")
        receiving = asyncio.ensure_future(layer.receive(channel))
        os.kill(frozen.proc.pid, signal.SIGSTOP)
        await asyncio.to_thread(cluster.wait, lambda: cluster.primary_port() not in (None, frozen.port), 30, "failover")
        promoted = cluster.primary()
        direct = redis.asyncio.Redis(host="127.0.0.1", port=promoted.port, password=cluster.password)
        try:
            deadline = time.monotonic() + 15
            while not receiving.done():
                await direct.publish(channel, layer.serialize({"type": "x", "n": 1}))
                await asyncio.wait([receiving], timeout=0.5)
                assert time.monotonic() < deadline, "the subscription stayed on the frozen primary"
        finally:
            await direct.aclose()
        assert receiving.result()["n"] == 1
        receiving.cancel()

    try:
        asyncio.run(scenario())
    finally:
        os.kill(frozen.proc.pid, signal.SIGCONT)
