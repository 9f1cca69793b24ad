"""The shared token bucket's Lua script (app/chat/throttle.py) on a real Redis."""
import pytest
import redis as redis_py

from app.chat.throttle import GCRA

pytestmark = pytest.mark.integration


def hit(client, key, count, period_s):
    return client.eval(GCRA, 1, key, period_s * 1000.0 / count, period_s * 1000.0)


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
