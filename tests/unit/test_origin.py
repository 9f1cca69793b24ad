"""The websocket Origin check compares scheme, host and port (app/chat/origin.py),
and the guard refuses a handshake without Host or with a foreign Origin before
the session lookup (through the real ASGI application)."""
import pytest
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import User
from django.test import Client

from app.chat import origin

HOST = "chat.example.com"


def scope(origin_value, host=HOST, forwarded_proto="https", scheme="ws"):
    headers = []
    if host is not None:
        headers.append((b"host", host.encode()))
    if origin_value is not None:
        headers.append((b"origin", origin_value.encode()))
    if forwarded_proto is not None:
        headers.append((b"x-forwarded-proto", forwarded_proto.encode()))
    return {"type": "websocket", "scheme": scheme, "headers": headers}


@pytest.fixture
def prod(settings):
    settings.DEBUG = False
    settings.SECURE_SSL_REDIRECT = True
    settings.ALLOWED_HOSTS = [HOST, ".example.net"]
    settings.CSRF_TRUSTED_ORIGINS = []
    return settings


@pytest.mark.parametrize("origin_value, host, proto, expected", [
    # positive controls
    ("https://chat.example.com", HOST, "https", True),
    ("https://chat.example.com:8443", "chat.example.com:8443", "https", True),
    ("https://a.example.net", "a.example.net", "https", True),  # another allowed host (subdomain pattern)
    ("https://CHAT.example.com", HOST, "https", True),
    # the bug: another scheme and port of an allowed host passed Channels' validator
    ("http://chat.example.com:6666", HOST, "https", False),
    ("https://chat.example.com:6666", HOST, "https", False),
    ("https://chat.example.com:443", "chat.example.com:8443", "https", False),
    ("https://chat.example.com", "chat.example.com:8443", "https", False),
    # plain http origins only when the site serves plain HTTP on purpose
    ("http://chat.example.com", HOST, None, False),
    # the client connected over plain ws (no TLS proxy): port 80, not 443
    ("https://chat.example.com", HOST, None, False),
    # foreign and malformed
    ("https://evil.example", HOST, "https", False),
    ("https://chat.example.com.evil.example", HOST, "https", False),
    ("null", HOST, "https", False),
    ("", HOST, "https", False),
    ("https://chat.example.com/path", HOST, "https", False),
    ("https://user@chat.example.com", HOST, "https", False),
    ("https://chat.example.com:99999", HOST, "https", False),
    ("ftp://chat.example.com", HOST, "https", False),
    (None, HOST, "https", False),  # no Origin
    ("https://chat.example.com", None, "https", False),  # no Host
])
def test_origin_scheme_host_and_port(prod, origin_value, host, proto, expected):
    assert origin.allowed(scope(origin_value, host, proto)) is expected


def test_scheme_comes_from_the_scope_without_a_proxy_header(prod):
    assert origin.allowed(scope("https://chat.example.com", forwarded_proto=None, scheme="wss"))
    assert not origin.allowed(scope("https://chat.example.com", forwarded_proto=None, scheme="ws"))
    # Django's rule: the proxy header wins over the scope, as for request.is_secure()
    assert not origin.allowed(scope("https://chat.example.com", forwarded_proto="http", scheme="wss"))


def test_http_origins_with_debug_or_without_ssl_redirect(prod):
    plain = scope("http://chat.example.com", forwarded_proto=None)
    assert not origin.allowed(plain)
    prod.SECURE_SSL_REDIRECT = False
    assert origin.allowed(plain)
    assert not origin.allowed(scope("http://chat.example.com:8000", forwarded_proto=None))  # port still counts
    prod.SECURE_SSL_REDIRECT, prod.DEBUG = True, True
    prod.ALLOWED_HOSTS = ["localhost", "127.0.0.1", "[::1]"]
    assert origin.allowed(scope("http://localhost:8000", "localhost:8000", None))
    assert origin.allowed(scope("http://[::1]:8000", "[::1]:8000", None))
    assert not origin.allowed(scope("http://localhost:8001", "localhost:8000", None))


def test_csrf_trusted_origins_are_allowed_as_written(prod):
    prod.CSRF_TRUSTED_ORIGINS = ["https://*.example.org", "https://app.example.io:8443", "http://plain.example.io"]
    assert origin.allowed(scope("https://a.example.org"))
    assert origin.allowed(scope("https://app.example.io:8443"))
    assert origin.allowed(scope("http://plain.example.io"))  # listed explicitly
    assert not origin.allowed(scope("https://a.example.org:8443"))
    assert not origin.allowed(scope("http://a.example.org"))
    assert not origin.allowed(scope("https://app.example.io"))
    assert not origin.allowed(scope("https://example.org.evil.example"))


def test_wildcard_hosts_still_need_a_same_host_origin(prod):
    prod.ALLOWED_HOSTS = ["*"]
    assert origin.allowed(scope("https://anything.example", "anything.example"))
    assert not origin.allowed(scope("https://evil.example", "anything.example"))
    assert not origin.allowed(scope("https://anything.example:444", "anything.example"))


# --- through the ASGI application ------------------------------------------------


@pytest.fixture
def session_cookie(db):
    user = User.objects.create_user("origin-user", password="pw-unused-123")
    client = Client()
    client.force_login(user)
    return f"sessionid={client.cookies['sessionid'].value}".encode()


async def handshake(headers, path="/ws/rooms/1/"):
    from app.asgi import application

    comm = WebsocketCommunicator(application, path, headers=headers)
    comm.scope.update(client=("198.51.100.7", 40000), scheme="ws")
    await comm.send_input({"type": "websocket.connect"})
    first = await comm.receive_output(5)
    if first["type"] == "websocket.accept":
        await comm.send_input({"type": "websocket.disconnect", "code": 1000})
    await comm.wait(5)
    return first


@pytest.mark.django_db(transaction=True)
async def test_application_refuses_foreign_port_and_missing_host(session_cookie):
    from asgiref.sync import sync_to_async

    from app.chat.models import Room

    room = await sync_to_async(Room.objects.create)(name="origin-room")
    path = f"/ws/rooms/{room.pk}/"
    good = [(b"host", HOST.encode()), (b"x-forwarded-proto", b"https"), (b"cookie", session_cookie)]
    # positive control: same user, same room, the site's own origin: accepted
    first = await handshake([*good, (b"origin", b"https://chat.example.com")], path)
    assert first["type"] == "websocket.accept", first
    for headers in ([*good, (b"origin", b"http://chat.example.com:6666")],
                    [*good, (b"origin", b"https://chat.example.com:6666")],
                    [h for h in good if h[0] != b"host"] + [(b"origin", b"https://chat.example.com")]):
        answer = await handshake(headers, path)
        assert answer == {"type": "websocket.close", "code": 1008}, (headers, answer)
