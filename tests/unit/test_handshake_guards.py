"""The websocket handshake refusals, through the whole `app.asgi.application`.

Every request here carries the session cookie of a user who really logged in
(through the login view), so the consumer would accept it: a refusal can only
come from the layer under test (Host, Origin, path, route), not from the
consumer turning away an anonymous user. Each refusal has a positive control
beside it: the same request with the good Host / Origin / path is accepted.

The requests look like what a browser on https://chat.example.com sends
through a TLS-terminating proxy (scope scheme "wss", X-Forwarded-Proto), and
the tests assert only on what the application answers, not on which
middleware class answers it.
"""
from __future__ import annotations

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.contrib.auth.models import User
from django.test import Client

from app.asgi import application
from app.chat.models import Room

pytestmark = pytest.mark.django_db(transaction=True)

SITE = "chat.example.com"  # in tests/settings.py ALLOWED_HOSTS
GOOD_ORIGIN = f"https://{SITE}"


@sync_to_async
def logged_in_session(name="alice"):
    """(room id, session cookie value) after a real POST to the login view."""
    User.objects.create_user(name, password="pw-for-the-test-123")
    room, _ = Room.objects.get_or_create(name="lobby")
    client = Client(HTTP_HOST=SITE)
    response = client.post("/accounts/login/", {"username": name, "password": "pw-for-the-test-123"}, secure=True)
    assert response.status_code == 302, response.status_code  # logged in: redirected to the rooms
    return room.pk, client.cookies[settings.SESSION_COOKIE_NAME].value


def handshake(path, *, host=SITE, origin=GOOD_ORIGIN, session=None):
    headers = []
    if host is not None:
        headers.append((b"host", host.encode()))
    if origin is not None:
        headers.append((b"origin", origin.encode()))
    headers.append((b"x-forwarded-proto", b"https"))
    if session is not None:
        headers.append((b"cookie", f"{settings.SESSION_COOKIE_NAME}={session}".encode()))
    comm = WebsocketCommunicator(application, path, headers=headers)
    # The path as the server puts it in the scope: WebsocketCommunicator parses
    # it as a URL, which would read "//ws/..." as a host name.
    comm.scope.update(path=path, scheme="wss", server=("127.0.0.1", 8000), client=("127.0.0.1", 50000))
    return comm


async def outcome(comm) -> bool:
    """True if the handshake was accepted (then closed again)."""
    connected, _ = await comm.connect()
    if connected:
        await comm.disconnect()
    return connected


async def test_positive_control_a_logged_in_browser_request_is_accepted():
    room_id, session = await logged_in_session()
    assert await outcome(handshake(f"/ws/rooms/{room_id}/", session=session))
    # and the same request without the session is refused (the consumer's own check)
    assert not await outcome(handshake(f"/ws/rooms/{room_id}/"))


@pytest.mark.parametrize("host", [
    "evil.example",
    f"{SITE}.evil.example",  # a suffix of an allowed name is not that name
    f"evil.example:443",
    "",
])
async def test_bad_host_is_refused_with_a_valid_session(host):
    room_id, session = await logged_in_session()
    assert not await outcome(handshake(f"/ws/rooms/{room_id}/", host=host, session=session))
    assert await outcome(handshake(f"/ws/rooms/{room_id}/", session=session))  # control: good Host


@pytest.mark.parametrize("origin", [
    "https://evil.example",
    f"https://{SITE}.evil.example",
    "null",
])
async def test_foreign_origin_is_refused_with_a_valid_session(origin):
    room_id, session = await logged_in_session()
    assert not await outcome(handshake(f"/ws/rooms/{room_id}/", origin=origin, session=session))
    assert await outcome(handshake(f"/ws/rooms/{room_id}/", session=session))  # control: good Origin


@pytest.mark.parametrize("template", [
    "//ws/rooms/{id}/",  # Channels' router strips leading slashes: this would reach the room
    "/ws/rooms/{id}//",
    "/ws/rooms/../rooms/{id}/",
    "/ws/./rooms/{id}/",
    "/ws/rooms/{id}/.",
])
async def test_non_canonical_path_is_refused_with_a_valid_session(template):
    room_id, session = await logged_in_session()
    assert not await outcome(handshake(template.format(id=room_id), session=session))
    assert await outcome(handshake(f"/ws/rooms/{room_id}/", session=session))  # control: canonical path


@pytest.mark.parametrize("path", ["/ws/nope/", "/ws/rooms/", "/ws/rooms/x/", "/", "/ws/../etc/passwd"])
async def test_unknown_path_is_refused_cleanly_with_a_valid_session(path):
    """Refused at the handshake (no exception escapes the router)."""
    room_id, session = await logged_in_session()
    assert not await outcome(handshake(path, session=session))
    assert await outcome(handshake(f"/ws/rooms/{room_id}/", session=session))


async def test_unknown_room_is_refused_with_a_valid_session():
    room_id, session = await logged_in_session()
    assert not await outcome(handshake(f"/ws/rooms/{room_id + 1000}/", session=session))
    assert await outcome(handshake(f"/ws/rooms/{room_id}/", session=session))
