"""Rate limits in-process (the buckets of app/chat/throttle.py without Redis;
tests/faults/test_limits.py runs them on the production stack): handshakes per
address through the ASGI application, logins and sign-ups per address,
failed logins per account (django-axes), and the fail-safe answers when the
store is unreachable (a real refused connection to 127.0.0.1:1)."""
import pytest
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import User
from django.db import connection
from django.test.utils import CaptureQueriesContext

from app.chat import throttle

DEAD_REDIS = "redis://127.0.0.1:1/0"
HOST = {"HTTP_HOST": "chat.example.com"}


@pytest.fixture
def member(transactional_db):
    """A signed-in user's cookie and a room (accepted handshakes are the positive control)."""
    from django.test import Client

    from app.chat.models import Room

    client = Client()
    client.force_login(User.objects.create_user("member", password="pw-unused-123"))
    return f"sessionid={client.cookies['sessionid'].value}".encode(), Room.objects.create(name="limits").pk


async def handshake(address, member, extensions=True):
    from app.asgi import application

    cookie, room = member
    headers = [(b"host", b"chat.example.com"), (b"origin", b"https://chat.example.com"), (b"x-forwarded-proto", b"https"),
               (b"cookie", cookie)]
    comm = WebsocketCommunicator(application, f"/ws/rooms/{room}/", headers=headers)
    comm.scope.update(client=(address, 40000), scheme="ws")
    if extensions:
        comm.scope["extensions"] = {"websocket.http.response": {}}
    await comm.send_input({"type": "websocket.connect"})
    out = [await comm.receive_output(5)]
    while out[-1]["type"] in ("websocket.accept", "websocket.send", "websocket.http.response.start"):
        if out[-1]["type"] != "websocket.http.response.start" and await comm.receive_nothing(0.3):
            break  # an open socket, nothing more to say
        out.append(await comm.receive_output(5))
    await comm.send_input({"type": "websocket.disconnect", "code": 1006})  # a consumer waits for it
    await comm.wait(5)
    return out


def refused_with_429(out) -> bool:
    return out[0]["type"] == "websocket.http.response.start" and out[0]["status"] == 429


def test_address_buckets():
    assert throttle.address_of("203.0.113.9") == "203.0.113.9"
    assert throttle.address_of("::ffff:203.0.113.9") == "203.0.113.9"
    # one subscriber's IPv6 block is one bucket
    assert throttle.address_of("2001:db8:1:2:aaaa::1") == throttle.address_of("2001:db8:1:2:bbbb::2") == "2001:db8:1:2::/64"
    assert throttle.address_of("2001:db8:1:3::1") != throttle.address_of("2001:db8:1:2::1")
    assert throttle.address_of(None) == "unknown"


def test_bucket_allows_the_burst_then_says_when():
    limit = throttle.Limit("unit", 3, 60)
    verdicts = [throttle.hit(limit, "x") for _ in range(5)]
    assert [v.allowed for v in verdicts] == [True, True, True, False, False]
    assert verdicts[3].retry_after == 20  # one token every 60/3 s
    assert throttle.hit(limit, "y").allowed  # another identity has its own bucket


def accepted(out) -> bool:
    return out[0]["type"] == "websocket.accept" and not any("data-error" in m.get("text", "") for m in out)


async def test_handshakes_per_address_get_429_with_retry_after(settings, member):
    settings.CHAT_ADDRESS_HANDSHAKES_PER_MINUTE = 3
    answers = [await handshake("198.51.100.1", member) for _ in range(5)]
    assert [accepted(a) for a in answers] == [True, True, True, False, False]
    assert [refused_with_429(a) for a in answers] == [False, False, False, True, True]
    start, body = answers[3][0], answers[3][1]
    assert dict(start["headers"])[b"retry-after"] == b"20"
    assert b"Too many connection attempts" in body["body"]
    assert accepted(await handshake("198.51.100.2", member))  # positive control: another address


async def test_without_the_http_response_extension_an_error_frame_and_1008(settings, member):
    settings.CHAT_ADDRESS_HANDSHAKES_PER_MINUTE = 1
    assert accepted(await handshake("198.51.100.3", member, extensions=False))
    out = await handshake("198.51.100.3", member, extensions=False)
    assert [m["type"] for m in out] == ["websocket.accept", "websocket.send", "websocket.close"]
    assert 'data-error="too_many_connections"' in out[1]["text"] and out[2]["code"] == 1008


async def test_handshake_limit_store_down_refuses_with_1013(settings, member):
    settings.CHAT_LIMITS_REDIS_URL = DEAD_REDIS
    out = await handshake("198.51.100.4", member)
    assert [m["type"] for m in out] == ["websocket.accept", "websocket.send", "websocket.close"]
    assert 'data-error="unavailable"' in out[1]["text"] and out[2]["code"] == 1013


# --- HTTP -------------------------------------------------------------------------


def login(client, username, password, address):
    return client.post("/accounts/login/", {"username": username, "password": password}, REMOTE_ADDR=address, **HOST)


@pytest.mark.django_db
def test_login_attempts_per_address(client, settings):
    settings.CHAT_ADDRESS_LOGINS_PER_MINUTE = 3
    statuses = [login(client, "nobody", "wrong-password", "203.0.113.1").status_code for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
    refused = login(client, "nobody", "wrong-password", "203.0.113.1")
    assert refused["Retry-After"] == "20" and b"Too many login attempts from your network" in refused.content
    # the admin's login form shares the budget
    assert client.post("/admin/login/", {"username": "a", "password": "b"}, REMOTE_ADDR="203.0.113.1", **HOST).status_code == 429
    # positive controls: another address; a GET of the form
    assert login(client, "nobody", "wrong-password", "203.0.113.2").status_code == 200
    assert client.get("/accounts/login/", REMOTE_ADDR="203.0.113.1", **HOST).status_code == 200


@pytest.mark.django_db
def test_signups_per_address(client, settings):
    settings.CHAT_ADDRESS_SIGNUPS_PER_HOUR = 2

    def signup(name, address):
        return client.post("/accounts/signup/", {"username": name, "password1": "a-Long-pass-42", "password2": "a-Long-pass-42"},
                           REMOTE_ADDR=address, **HOST)

    assert [signup(f"u{n}", "203.0.113.3").status_code for n in range(3)] == [302, 302, 429]
    assert not User.objects.filter(username="u2").exists()
    assert signup("u3", "203.0.113.4").status_code == 302  # positive control: another address


@pytest.mark.django_db
def test_failed_logins_lock_the_account_whatever_the_address(client, settings):
    settings.AXES_FAILURE_LIMIT = 3
    User.objects.create_user("victim", password="the-Right-pass-1")
    User.objects.create_user("bystander", password="the-Right-pass-2")
    statuses = [login(client, "victim", "guess", f"203.0.113.{10 + n}").status_code for n in range(3)]
    assert statuses == [200, 200, 429]  # the third failure locks
    locked = login(client, "victim", "the-Right-pass-1", "203.0.113.50")  # even the right password, from elsewhere
    assert locked.status_code == 429 and b"Too many failed logins for this account" in locked.content
    assert int(locked["Retry-After"]) == int(settings.AXES_COOLOFF_TIME.total_seconds())
    assert "_auth_user_id" not in client.session
    # positive control: another account is not affected
    assert login(client, "bystander", "the-Right-pass-2", "203.0.113.10").status_code == 302


@pytest.mark.django_db
def test_a_success_resets_the_failures(client, settings):
    settings.AXES_FAILURE_LIMIT = 3
    User.objects.create_user("forgetful", password="the-Right-pass-3")
    for _ in range(2):
        assert login(client, "forgetful", "guess", "203.0.113.20").status_code == 200
    assert login(client, "forgetful", "the-Right-pass-3", "203.0.113.20").status_code == 302
    client.logout()
    for _ in range(2):
        assert login(client, "forgetful", "guess", "203.0.113.20").status_code == 200


@pytest.mark.django_db
def test_login_limit_store_down_is_a_503_not_a_500(client, settings):
    settings.CHAT_LIMITS_REDIS_URL = DEAD_REDIS
    r = login(client, "nobody", "wrong-password", "203.0.113.30")
    assert r.status_code == 503 and r["Retry-After"] == "5" and b"unavailable" in r.content


@pytest.fixture
def axes_cache_on_dead_redis(settings):
    from axes.handlers.proxy import AxesProxyHandler

    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": DEAD_REDIS,
                                   "OPTIONS": {"socket_connect_timeout": 1, "socket_timeout": 1}}}
    AxesProxyHandler.get_implementation(force=True)  # it holds its cache from start-up
    yield
    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    AxesProxyHandler.get_implementation(force=True)


@pytest.mark.django_db
def test_failed_login_counts_unreachable_is_a_503_not_a_500(client, axes_cache_on_dead_redis):
    # django-axes' counts live in the cache: a dead Redis there refuses too.
    User.objects.create_user("someone", password="the-Right-pass-4")
    r = login(client, "someone", "the-Right-pass-4", "203.0.113.31")
    assert r.status_code == 503 and b"unavailable" in r.content
    assert "_auth_user_id" not in client.session


# --- /readyz ------------------------------------------------------------------------


@pytest.mark.django_db
def test_readyz_checks_at_most_once_a_second(client, monkeypatch):
    from app import health

    monkeypatch.setattr(health, "_ready", {"at": 0.0, "result": None, "task": None})
    with CaptureQueriesContext(connection) as queries:
        answers = [client.get("/readyz", **HOST) for _ in range(20)]
    assert {a.status_code for a in answers} == {200}
    assert sum("SELECT 1" in q["sql"] for q in queries.captured_queries) == 1
    # positive control: once the result is older than READY_CACHE_SECONDS, it is checked again
    monkeypatch.setattr(health, "READY_CACHE_SECONDS", 0.0)
    with CaptureQueriesContext(connection) as queries:
        for _ in range(3):
            client.get("/readyz", **HOST)
    assert sum("SELECT 1" in q["sql"] for q in queries.captured_queries) == 3
