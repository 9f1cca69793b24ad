"""Socket slots per user (app/chat/slots.py) on a real Redis: the limit, a
dead worker's slots freed when its lease lapses (and not before), a live
worker's slots written back after Redis lost them, and a failed release
retried. The SIGKILL of a real gunicorn worker is in
tests/faults/test_user_limits.py."""
import asyncio
import uuid

import pytest
import redis as redis_py

from app.chat import slots

pytestmark = pytest.mark.integration


@pytest.fixture
def shared(settings, redis):
    settings.CHAT_LIMITS_REDIS_URL = redis.url
    client = redis_py.Redis(host="127.0.0.1", port=redis.port)
    client.flushall()
    yield client
    client.flushall()


async def dead_worker_takes(client, user_id, n, lease_ms):
    """Slots taken by another worker process (its own id and lease), as the script does."""
    worker = uuid.uuid4().hex
    for _ in range(n):
        client.eval(slots.ACQUIRE, 1, slots._user_key(user_id), 100, uuid.uuid4().hex, worker, slots.LEASE_PREFIX,
                    lease_ms, 60_000)
    return worker


async def test_the_limit_counts_every_worker_and_a_dead_ones_slots_free_when_its_lease_lapses(shared):
    await dead_worker_takes(shared, 7, 3, lease_ms=1500)
    assert await slots.acquire(7, "mine-1", 4) == (True, 4)
    assert await slots.acquire(7, "mine-2", 4) == (False, 4)  # the other worker's 3 still count
    assert await slots.acquire(8, "other-user", 4) == (True, 1)  # positive control
    await asyncio.sleep(1.7)  # the other worker's lease lapses (it was never renewed: a SIGKILL)
    assert await slots.acquire(7, "mine-2", 4) == (True, 2)  # its 3 entries are gone, mine stay
    assert set(shared.hkeys(slots._user_key(7))) == {b"mine-1", b"mine-2"}
    await slots.release(7, "mine-1")
    await slots.release(7, "mine-2")
    await slots.release(8, "other-user")
    assert not shared.exists(slots._user_key(7))


async def test_a_live_workers_slots_come_back_after_redis_lost_them(shared):
    assert (await slots.acquire(9, "a", 2))[0] and (await slots.acquire(9, "b", 2))[0]
    shared.flushall()  # a Redis restart without persistence
    await slots.renew_once()
    assert set(shared.hkeys(slots._user_key(9))) == {b"a", b"b"}
    assert await slots.acquire(9, "c", 2) == (False, 2)
    await slots.release(9, "a")
    await slots.release(9, "b")


async def test_a_release_that_failed_is_retried(shared, settings, redis):
    assert (await slots.acquire(10, "x", 1))[0]
    settings.CHAT_LIMITS_REDIS_URL = "redis://127.0.0.1:1/0"  # unreachable while it closes
    await slots.release(10, "x")
    assert shared.hexists(slots._user_key(10), "x")
    settings.CHAT_LIMITS_REDIS_URL = redis.url
    await slots.renew_once()
    assert not shared.hexists(slots._user_key(10), "x")
    assert await slots.acquire(10, "y", 1) == (True, 1)
    await slots.release(10, "y")
