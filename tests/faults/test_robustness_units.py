"""Fast in-process checks of the robustness pieces (no services): the resync
after lost publishes and the log filters. (The websocket guard's refusals,
with a logged-in session and positive controls: tests/unit/test_handshake_guards.py.)
The real-stack scenarios next to this file exercise the same code for real."""
from __future__ import annotations

import json
import logging
import re
import sys

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import User

from app.chat.models import Message, Room

pytestmark = pytest.mark.django_db(transaction=True)

ORIGIN = (b"origin", b"https://chat.example.com")


@database_sync_to_async
def user_and_room(name):
    user = User.objects.create_user(name, password="pw-unused-123")
    room, _ = Room.objects.get_or_create(name="lobby")
    return user, room


def communicator(room_id, user, query="after=0", headers=None, path=None):
    from app.chat.consumers import ChatConsumer

    path = path or f"/ws/rooms/{room_id}/?{query}"
    comm = WebsocketCommunicator(ChatConsumer.as_asgi(), path, headers=headers or [ORIGIN, (b"host", b"chat.example.com")])
    comm.scope["user"] = user
    comm.scope["url_route"] = {"kwargs": {"room_id": room_id}}
    comm.scope["query_string"] = query.encode()
    return comm


async def test_resync_sends_what_a_lost_publish_never_delivered_once():
    from app.chat import resync

    alice, room = await user_and_room("alice")
    comm = communicator(room.pk, alice)
    assert (await comm.connect())[0]
    assert await comm.receive_nothing(timeout=0.1)
    # Stored but never published: what a group_send during a Redis outage leaves.
    for n in range(3):
        await database_sync_to_async(Message.objects.create)(room=room, author=alice, body=f"lost {n}")
    rooms, sent = await resync.resync_all()
    assert (rooms, sent) == (1, 3)
    frames = [await comm.receive_from() for _ in range(3)]
    assert [f"lost {n}" in f for n, f in enumerate(frames)] == [True] * 3
    assert await resync.resync_all() == (1, 0)  # nothing twice
    assert await comm.receive_nothing(timeout=0.1)
    await comm.send_to(text_data=json.dumps({"message": "live"}))
    live = await comm.receive_from()
    assert "live" in live
    assert await resync.resync_all() == (1, 0)  # the live one is not sent again
    await comm.disconnect()
    assert resync.local_sockets() == 0


def _record(logger, exc):
    try:
        raise exc
    except type(exc):
        return logging.getLogger(logger).makeRecord(logger, logging.ERROR, __file__, 1, "Unexpected exception in receive task",
                                                    (), sys.exc_info())


def test_log_filters_keep_one_line_without_traceback():
    from redis.exceptions import ConnectionError as RedisConnectionError

    from app.chat.logfilters import OneLine, QuietClientFault, QuietRedisOutage

    quiet = QuietRedisOutage()
    first = _record("channels_redis.pubsub", RedisConnectionError("Error 111 connecting"))
    assert quiet.filter(first) and first.exc_info is None and first.levelname == "WARNING"
    assert re.search(r"ConnectionError: Error 111", first.getMessage())
    assert not quiet.filter(_record("channels_redis.pubsub", RedisConnectionError("again")))  # rate-limited
    other = _record("channels_redis.pubsub", ValueError("a real bug"))
    assert quiet.filter(other) and other.exc_info is not None  # real bugs keep their traceback

    utf = _record("uvicorn.error", UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"))
    assert QuietClientFault().filter(utf) and utf.exc_info is None
    host = _record("django.security.DisallowedHost", ValueError("Invalid HTTP_HOST header"))
    assert OneLine().filter(host) and host.exc_info is None and host.levelname == "WARNING"
