"""ChatConsumer through Channels' WebsocketCommunicator (in-memory layer).

The handshake refusals of the whole application (Host, Origin, path, unknown
route), each with a logged-in session and a positive control, are in
test_handshake_guards.py."""
import json

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import AnonymousUser, User

from app.chat.models import Message, Room

pytestmark = pytest.mark.django_db(transaction=True)

ORIGIN = (b"origin", b"https://chat.example.com")


@database_sync_to_async
def make_user_and_room(name="alice"):
    user = User.objects.create_user(name, password="pw-unused-123")
    room, _ = Room.objects.get_or_create(name="lobby")
    return user, room


def communicator(room_id, user, query="", origin=ORIGIN):
    from app.chat.consumers import ChatConsumer

    app = ChatConsumer.as_asgi()
    path = f"/ws/rooms/{room_id}/" + (f"?{query}" if query else "")
    comm = WebsocketCommunicator(app, path, headers=[origin, (b"host", b"chat.example.com")])
    comm.scope["user"] = user
    comm.scope["url_route"] = {"kwargs": {"room_id": room_id}}
    comm.scope["query_string"] = query.encode()
    return comm


async def send_json(comm, data):
    await comm.send_to(text_data=json.dumps(data))


async def test_anonymous_is_refused():
    _, room = await make_user_and_room()
    comm = communicator(room.pk, AnonymousUser())
    connected, _ = await comm.connect()
    assert not connected


async def test_message_is_stored_escaped_and_fanned_out_once_rendered():
    alice, room = await make_user_and_room("alice")
    bob, _ = await make_user_and_room("bob")
    a, b = communicator(room.pk, alice), communicator(room.pk, bob)
    assert (await a.connect())[0] and (await b.connect())[0]
    await send_json(a, {"message": "<b>hi</b> & bye", "HEADERS": {"HX-Request": "true"}})
    frame_a, frame_b = await a.receive_from(), await b.receive_from()
    assert frame_a == frame_b  # rendered once, sent as-is to everybody
    assert "&lt;b&gt;hi&lt;/b&gt; &amp; bye" in frame_a and "<b>hi</b>" not in frame_a
    assert 'hx-swap-oob="beforeend:#messages"' in frame_a
    stored = await database_sync_to_async(lambda: list(Message.objects.values_list("body", flat=True)))()
    assert stored == ["<b>hi</b> & bye"]
    await a.disconnect()
    await b.disconnect()


@pytest.mark.parametrize(
    "frame, code",
    [
        ({"bytes_data": b"\x00\x01"}, "binary"),
        ({"text_data": "not json"}, "bad_json"),
        ({"text_data": "[1, 2]"}, "bad_json"),
        ({"text_data": "[" * 100_000 + "]" * 100_000}, "too_long"),
        ({"text_data": "[" * 5000 + "]" * 5000}, "bad_json"),
        ({"text_data": json.dumps({"msg": "x"})}, "missing_message"),
        ({"text_data": json.dumps({"message": 42})}, "missing_message"),
        ({"text_data": json.dumps({"message": "   "})}, "empty"),
        ({"text_data": json.dumps({"message": "x" * 2001})}, "too_long"),
        ({"text_data": json.dumps({"message": "a\u0000b"})}, "bad_text"),
        ({"text_data": '{"message": "\\ud800"}'}, "bad_text"),
    ],
)
async def test_bad_frames_get_an_error_frame_and_the_socket_stays_usable(frame, code):
    user, room = await make_user_and_room()
    comm = communicator(room.pk, user)
    assert (await comm.connect())[0]
    await comm.send_to(**frame)
    reply = await comm.receive_from()
    assert f'data-error="{code}"' in reply
    await send_json(comm, {"message": "still here"})
    assert "still here" in await comm.receive_from()
    assert await database_sync_to_async(Message.objects.count)() == 1
    await comm.disconnect()


async def test_flood_is_rate_limited(settings):
    settings.CHAT_RATE_BURST = 3
    settings.CHAT_RATE_PER_SECOND = 0.5
    user, room = await make_user_and_room()
    comm = communicator(room.pk, user)
    assert (await comm.connect())[0]
    replies = []
    for n in range(5):
        await send_json(comm, {"message": f"m{n}"})
        replies.append(await comm.receive_from())
    assert sum("data-msg-id" in r for r in replies) == 3
    assert sum('data-error="rate_limited"' in r for r in replies) == 2
    await comm.disconnect()


async def test_reconnect_replays_what_was_missed_without_duplicates():
    alice, room = await make_user_and_room("alice")
    bob, _ = await make_user_and_room("bob")
    a = communicator(room.pk, alice)
    assert (await a.connect())[0]
    await send_json(a, {"message": "seen"})
    seen_id = int(__import__("re").search(r'data-msg-id="(\d+)"', await a.receive_from()).group(1))
    await a.disconnect()
    b = communicator(room.pk, bob)
    assert (await b.connect())[0]
    for n in range(3):
        await send_json(b, {"message": f"missed {n}"})
        await b.receive_from()
    a = communicator(room.pk, alice, query=f"after={seen_id}")
    assert (await a.connect())[0]
    replayed = [await a.receive_from() for _ in range(3)]
    assert [f"missed {n}" in r for n, r in enumerate(replayed)] == [True] * 3
    assert await a.receive_nothing(timeout=0.2)
    await send_json(b, {"message": "live"})
    assert "live" in await a.receive_from()
    await a.disconnect()
    await b.disconnect()


async def test_replayed_message_is_not_delivered_twice():
    """A message stored before the replay query but published after the
    socket joined the group arrives both ways: it must be shown once."""
    from channels.layers import get_channel_layer

    from app.chat.consumers import room_group
    from app.chat.rendering import article_html_from, message_frame

    alice, room = await make_user_and_room("alice")
    msg = await database_sync_to_async(Message.objects.create)(room=room, author=alice, body="both ways")
    comm = communicator(room.pk, alice, query="after=0")
    assert (await comm.connect())[0]
    assert "both ways" in await comm.receive_from()
    html = await database_sync_to_async(lambda: message_frame(article_html_from(Message.objects.select_related("author").get(pk=msg.pk))))()
    await get_channel_layer().group_send(room_group(room.pk), {"type": "chat.message", "id": msg.pk, "html": html})
    assert await comm.receive_nothing(timeout=0.3)
    await comm.disconnect()
