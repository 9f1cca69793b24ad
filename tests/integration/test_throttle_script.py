"""The shared token buckets (app/chat/throttle.py) on a real Redis: the Lua
script, and the async hits that go to it in batches."""
import asyncio

import pytest
import redis as redis_py

from app.chat import throttle
from app.chat.throttle import GCRA

pytestmark = pytest.mark.integration


def hit(client, key, count, period_s):
    [wait] = client.eval(GCRA, 1, key, period_s * 1000.0 / count, period_s * 1000.0)
    return wait


def test_a_bucket_allows_its_burst_then_says_how_long_to_wait(redis):
    client = redis_py.Redis(host="127.0.0.1", port=redis.port)
    assert [hit(client, "t:small", 3, 60) for _ in range(3)] == [0, 0, 0]
    wait_ms = hit(client, "t:small", 3, 60)
    assert 0 < wait_ms <= 20_000
    assert 0 < client.pttl("t:small") <= 60_000


def test_a_limit_too_large_to_matter_never_errors(redis):
    """10**9 a minute (what load tests set) makes each token 0.00006 ms, below a
    double's precision at epoch milliseconds: the expiry must still be valid."""
    client = redis_py.Redis(host="127.0.0.1", port=redis.port)
    assert [hit(client, "t:huge", 10**9, 60) for _ in range(50)] == [0] * 50
    # The key expires within a millisecond or two: gone (-2) or about to go, never
    # kept without an expiry (-1). (">= 1" was flaky: a busy machine reads 0.)
    assert client.pttl("t:huge") in (-2, 0, 1, 2)


def test_one_call_takes_from_several_buckets_in_order(redis):
    """A batch: the same bucket twice counts twice, another bucket on its own."""
    client = redis_py.Redis(host="127.0.0.1", port=redis.port)
    two_per_minute = (30_000.0, 60_000.0)
    waits = client.eval(GCRA, 4, "t:a", "t:a", "t:b", "t:a", *two_per_minute * 4)
    assert waits[:3] == [0, 0, 0]  # a, a (its burst of 2), b
    assert 0 < waits[3] <= 30_000  # a's third: refused, with the wait


@pytest.fixture
def shared(settings, redis):
    settings.CHAT_LIMITS_REDIS_URL = redis.url
    client = redis_py.Redis(host="127.0.0.1", port=redis.port)
    client.flushall()
    client.config_resetstat()
    yield client
    client.flushall()


def script_calls(client) -> int:
    stats = client.info("commandstats")
    return sum(stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in ("evalsha", "eval"))


async def test_concurrent_hits_share_round_trips_and_each_counts(shared):
    limit = throttle.Limit("batch", 5, 60)
    verdicts = await asyncio.gather(*(throttle.ahit(limit, "u1") for _ in range(40)),
                                    *(throttle.ahit(limit, "u2") for _ in range(3)))
    # Every hit counted once, in the order asked: u1's burst of 5 then refusals; u2 its own.
    assert [v.allowed for v in verdicts[:40]] == [True] * 5 + [False] * 35
    assert all(v.allowed for v in verdicts[40:])
    assert all(v.retry_after >= 1 for v in verdicts[5:40])
    calls = script_calls(shared)
    assert 1 <= calls <= 3, calls  # 43 hits: the first alone, the rest together (a NOSCRIPT retry at most)
    # Positive control: one at a time, each hit is its own call.
    before = script_calls(shared)
    for _ in range(4):
        await throttle.ahit(limit, "u3")
    assert script_calls(shared) - before == 4


async def test_a_batch_that_fails_fails_every_hit_and_the_next_goes_through(shared, settings, redis):
    limit = throttle.Limit("batch-down", 5, 60)
    assert (await throttle.ahit(limit, "x")).allowed
    shared.client_pause(int(throttle.TIMEOUT * 1000) + 1500)  # Redis answers nothing meanwhile
    results = await asyncio.gather(*(throttle.ahit(limit, "x") for _ in range(6)), return_exceptions=True)
    assert all(isinstance(r, throttle.Unavailable) for r in results), results  # refused, not hung
    shared.client_unpause()
    assert (await throttle.ahit(limit, "y")).allowed
