"""A client that leaves during the handshake leaves nothing behind (issue #13's churn).

The chat consumer takes a socket slot (app/chat/slots.py) and joins the room
group before it accepts. When the client has gone by then, Uvicorn's `accept`
raises ClientDisconnected; Channels calls disconnect() only for a
`websocket.disconnect` it handles, so before the fix the slot and the group
membership stayed for the worker's life (measured in a gunicorn worker: 300
handshakes abandoned after 2-60 ms left 20 slots held and 20 members in the
room group; the user's limit then refused sockets the user did not have).

Real parts: the production protocol behind a real Uvicorn server in this
event loop, a raw TCP client that sends the handshake and resets the
connection, the chat consumer with the test settings' channel layer and
per-process slots. The wrapper in front of the consumer only waits, for the
abandoned ones, until Uvicorn has seen the connection go (the timing a
loaded worker gives: connect() still reading the database when the client leaves).
"""
import asyncio
import base64
import logging
import os

import pytest
import uvicorn
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.contrib.auth.models import User
from websockets.asyncio.client import connect

from app.chat import layer, resync, revocation, slots
from app.chat.consumers import ChatConsumer, room_group
from app.chat.guard import WebsocketGuard
from app.chat.models import Room
from app.observability.metrics import REGISTRY
from app.uvicorn_worker import ChatUvicornWorker

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(params=["consumer"])
async def served(request):
    """The chat consumer behind a real Uvicorn server; with param "guard", behind
    the production's outermost middleware (app/chat/guard.py) as well."""
    user = await database_sync_to_async(User.objects.create_user)("carol", password="pw-unused-123")
    room = await database_sync_to_async(Room.objects.create)(name="lobby")
    consumer_app = ChatConsumer.as_asgi()
    if request.param == "guard":
        consumer_app = WebsocketGuard(consumer_app)
    ended = []
    holder = {}

    async def app(scope, receive, send):
        scope = dict(scope, user=user, url_route={"kwargs": {"room_id": room.pk}})
        if b"abandon" in scope.get("query_string", b""):
            server = holder["server"]
            while server.server_state.connections:  # the client reset it: Uvicorn saw it go
                await asyncio.sleep(0.005)
        try:
            await consumer_app(scope, receive, send)
            ended.append(None)
        except Exception as exc:  # what app/chat/guard.py catches in production (an OSError)
            ended.append(type(exc).__name__)

    kwargs = ChatUvicornWorker.CONFIG_KWARGS
    server = holder["server"] = uvicorn.Server(uvicorn.Config(
        app, host="127.0.0.1", port=0, log_level="warning", lifespan="off",
        ws=kwargs["ws"], ws_per_message_deflate=kwargs["ws_per_message_deflate"]))
    server.install_signal_handlers = lambda: None  # the test runner keeps its own
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield port, user, room, ended
    server.should_exit = True
    await asyncio.wait_for(task, 10)


# What a browser on the test settings' site sends through a TLS-terminating
# proxy on 127.0.0.1 (Uvicorn trusts its X-Forwarded-Proto): the guard's Host
# and Origin checks pass.
SITE_HEADERS = {"Host": "chat.example.com", "Origin": "https://chat.example.com", "X-Forwarded-Proto": "https"}


def site_socket(port: int, room):
    """A real websocket client on the site's URL, connected to 127.0.0.1:port."""
    url = f"ws://{SITE_HEADERS['Host']}/ws/rooms/{room.pk}/?after=0"
    extra = {name: value for name, value in SITE_HEADERS.items() if name != "Host"}  # Host: from the URL
    return connect(url, additional_headers=extra, compression=None, host="127.0.0.1", port=port)


async def abandon_handshake(port: int, room_id: int) -> None:
    """Send a websocket handshake, then reset the connection before any answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    site = "".join(f"{name}: {value}\r\n" for name, value in SITE_HEADERS.items())
    writer.write((f"GET /ws/rooms/{room_id}/?abandon=1 HTTP/1.1\r\n{site}"
                  f"Upgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    await writer.drain()
    writer.transport.abort()


async def wait_for(predicate, what: str, timeout: float = 10.0):
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(what)


def members(room) -> dict:
    return get_channel_layer().groups.get(room_group(room.pk), {})


async def test_handshakes_abandoned_before_accept_keep_no_slot_and_no_group_membership(served, settings):
    port, user, room, ended = served
    settings.CHAT_MAX_SOCKETS_PER_USER = 2
    assert slots.held_here() == 0 and not members(room)

    abandoned = 5  # more than the user's limit
    for i in range(abandoned):
        await abandon_handshake(port, room.pk)
        await wait_for(lambda: len(ended) == i + 1, "the consumer never ended")
    # Each one got as far as accept: the slot and the group were taken, then accept found the client gone.
    assert ended == ["ClientDisconnected"] * abandoned

    assert slots.held_here() == 0
    assert not members(room)
    assert not layer._offers and revocation.local_sockets() == 0 and resync.local_sockets() == 0

    # The user's limit is theirs again: a socket opens, is accepted and registered (not 1008 too_many_sockets).
    async with site_socket(port, room):
        await wait_for(lambda: revocation._by_user.get(user.pk), "the socket was refused (its slots were leaked)")
        assert slots.held_here() == 1 and len(members(room)) == 1
    await wait_for(lambda: len(ended) == abandoned + 1, "the open socket's consumer never ended")
    assert slots.held_here() == 0 and not members(room)


def handshakes(outcome: str) -> float:
    return REGISTRY.get_sample_value("chat_websocket_handshakes_total", {"outcome": outcome}) or 0.0


@pytest.mark.parametrize("served", ["guard"], indirect=True)
async def test_the_guard_counts_a_client_that_left_as_gone_not_as_an_outage(served, caplog):
    """Uvicorn's ClientDisconnected is an OSError: the guard used to read it as an
    outage ("backend unavailable" warning, an `unavailable` handshake, an error
    frame sent to nobody). Whether the guard is in front or not, nothing is kept."""
    port, user, room, ended = served
    gone, unavailable, accepted = handshakes("client_gone"), handshakes("unavailable"), handshakes("accepted")
    abandoned = 3
    for i in range(abandoned):
        await abandon_handshake(port, room.pk)
        await wait_for(lambda: len(ended) == i + 1, "the consumer never ended")
    assert ended == [None] * abandoned  # the guard ended it quietly
    assert handshakes("client_gone") - gone == abandoned
    assert handshakes("unavailable") == unavailable and handshakes("accepted") == accepted
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("app.")]
    assert slots.held_here() == 0 and not members(room)

    # Positive control: through the same guard, a client that stays is accepted and counted so.
    async with site_socket(port, room):
        await wait_for(lambda: revocation._by_user.get(user.pk), "the socket was refused")
    assert handshakes("accepted") - accepted == 1
