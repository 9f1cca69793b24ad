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
    seen = int(__import__("re").search(r'data-seq="(\d+)"', await a.receive_from()).group(1))
    await a.disconnect()
    b = communicator(room.pk, bob)
    assert (await b.connect())[0]
    for n in range(3):
        await send_json(b, {"message": f"missed {n}"})
        await b.receive_from()
    a = communicator(room.pk, alice, query=f"after={seen}")
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
    await get_channel_layer().group_send(room_group(room.pk), {"type": "chat.message", "id": msg.pk, "seq": msg.seq,
                                                               "html": html})
    assert await comm.receive_nothing(timeout=0.3)
    await comm.disconnect()


def _seq(frame):
    return int(__import__("re").search(r'data-seq="(\d+)"', frame).group(1))


async def _publish(room, msg):
    """What the worker that stored `msg` does after its commit."""
    from channels.layers import get_channel_layer

    from app.chat.consumers import room_group
    from app.chat.rendering import article_html_from, message_frame

    html = await database_sync_to_async(
        lambda: message_frame(article_html_from(Message.objects.select_related("author").get(pk=msg.pk))))()
    await get_channel_layer().group_send(room_group(room.pk), {"type": "chat.message", "id": msg.pk, "seq": msg.seq,
                                                               "html": html})


async def test_out_of_order_publish_a_reconnect_with_the_watermark_gets_the_gap():
    """Worker B publishes seq 2 before worker A publishes seq 1; the page shows
    2, reconnects (with its watermark, 0: not the newest seq it shows) before 1
    is published, and must still get 1. With ?after=<newest shown> it never would."""
    alice, room = await make_user_and_room("alice")
    a = communicator(room.pk, alice, query="after=0")
    assert (await a.connect())[0]
    first = await database_sync_to_async(Message.objects.create)(room=room, author=alice, body="first")
    second = await database_sync_to_async(Message.objects.create)(room=room, author=alice, body="second")
    assert (first.seq, second.seq) == (1, 2)
    await _publish(room, second)
    assert _seq(await a.receive_from()) == 2
    await a.disconnect()
    await _publish(room, first)  # while the page is away
    a = communicator(room.pk, alice, query="after=0")  # the watermark: 1 is still missing
    assert (await a.connect())[0]
    replayed = [await a.receive_from() for _ in range(2)]
    assert [_seq(f) for f in replayed] == [1, 2]  # 2 again: the page drops it (already shown)
    assert await a.receive_nothing(timeout=0.2)
    await a.disconnect()


async def test_resync_fills_a_gap_left_by_a_lost_publish_exactly():
    """Seq 2 arrives live, seq 1's publish is lost: the resync sends 1 and
    only 1, and the socket's watermark then covers both."""
    from app.chat import resync

    alice, room = await make_user_and_room("alice")
    a = communicator(room.pk, alice, query="after=0")
    assert (await a.connect())[0]
    first = await database_sync_to_async(Message.objects.create)(room=room, author=alice, body="lost publish")
    second = await database_sync_to_async(Message.objects.create)(room=room, author=alice, body="live")
    await _publish(room, second)
    assert _seq(await a.receive_from()) == 2
    assert await resync.resync_all() == (1, 1)
    frame = await a.receive_from()
    assert _seq(frame) == 1 and "lost publish" in frame
    assert await resync.resync_all() == (1, 0)
    await _publish(room, first)  # a late publish of 1 is not shown twice
    assert await a.receive_nothing(timeout=0.2)
    await a.disconnect()


async def test_a_cursor_beyond_the_room_does_not_silence_the_socket():
    """?after= larger than the room's newest seq (a made-up value, a page from
    another database) counts as 'shows everything': new messages still arrive."""
    alice, room = await make_user_and_room("alice")
    await database_sync_to_async(Message.objects.create)(room=room, author=alice, body="old")
    a = communicator(room.pk, alice, query="after=999999999999")
    assert (await a.connect())[0]
    assert await a.receive_nothing(timeout=0.1)
    await send_json(a, {"message": "new"})
    frame = await a.receive_from()
    assert "new" in frame and _seq(frame) == 2
    await a.disconnect()


async def test_a_replay_cut_at_the_history_limit_moves_the_cursor_on(settings):
    """More missed than CHAT_HISTORY: the replay sends the newest and a cursor
    frame saying the older ones were skipped, so the page stops waiting for them."""
    settings.CHAT_HISTORY = 3
    alice, room = await make_user_and_room("alice")
    for n in range(6):
        await database_sync_to_async(Message.objects.create)(room=room, author=alice, body=f"m{n}")
    a = communicator(room.pk, alice, query="after=1")
    assert (await a.connect())[0]
    frames = [await a.receive_from() for _ in range(4)]
    assert 'data-upto="3"' in frames[0] and "data-msg-id" not in frames[0]
    assert [_seq(f) for f in frames[1:]] == [4, 5, 6]
    assert await a.receive_nothing(timeout=0.1)
    await a.disconnect()


async def test_nothing_is_sent_after_the_close():
    """The revocation listener and the resync call into a consumer from their
    own tasks: a frame or a second close after the socket was closed must not
    reach the server (Uvicorn raises on it: a traceback in production).
    Positive control: the same send before the close arrives."""
    from app.chat import revocation

    alice, room = await make_user_and_room("alice")
    a = communicator(room.pk, alice, query="after=0")
    assert (await a.connect())[0]
    (consumer,) = revocation._by_user[alice.pk]
    await consumer.send(text_data="before the close")
    assert await a.receive_from() == "before the close"
    assert await consumer.revoke("signed_out")
    assert 'data-error="signed_out"' in await a.receive_from()
    assert (await a.receive_output())["type"] == "websocket.close"
    await consumer.send(text_data="a late resync copy")
    await consumer.close(code=1000)
    assert await a.receive_nothing(timeout=0.2)
    await a.disconnect()


async def test_an_offered_room_message_is_written_once_and_declined_events_are_left_to_the_queue():
    """The worker's fan-out (app/chat/layer.py) calls consumer.offer directly;
    with the in-memory layer of the unit tests nothing else calls it, so this
    drives it by hand. A seq is written once (a second offer, or a resync copy,
    is dropped); other event types are declined (False: the queue path);
    after a revocation nothing more is written."""
    from app.chat import layer, revocation

    alice, room = await make_user_and_room("alice")
    a = communicator(room.pk, alice, query="after=0")
    assert (await a.connect())[0]
    (consumer,) = revocation._by_user[alice.pk]
    assert await a.receive_nothing(timeout=0.2)  # the replay (nothing to replay) registers the offer when done
    offer = layer._offers[consumer.channel_name]
    event = {"type": "chat.message", "id": 1, "seq": 1, "html": "<article>one</article>", "at": None}
    assert offer(event) is True
    assert await a.receive_from() == "<article>one</article>"
    assert offer(dict(event)) is True  # the same seq again: taken, not written
    assert await consumer.catch_up([(1, 1, "<article>one</article>")]) == 0
    assert offer({"type": "chat.revoke", "user": alice.pk}) is False
    assert await a.receive_nothing(timeout=0.2)
    assert offer({**event, "seq": 2, "html": "<article>two</article>"}) is True
    assert await a.receive_from() == "<article>two</article>"
    assert await consumer.revoke("signed_out")
    assert 'data-error="signed_out"' in await a.receive_from()
    assert (await a.receive_output())["type"] == "websocket.close"
    assert offer({**event, "seq": 3, "html": "<article>three</article>"}) is True
    assert await a.receive_nothing(timeout=0.2)
    await a.disconnect()
    assert consumer.channel_name not in layer._offers
