"""app/chat/wire.py: room messages written straight to Uvicorn's transport.

Pins what the adapter relies on, against the installed Uvicorn and websockets:
the frame it builds is websockets' own framing of the same text, Uvicorn's
`send` leads to its protocol object, and a real Uvicorn connection (the
production protocol, websockets-sansio) gets the frames a ChatConsumer
writes through it, in order, with flow control and close respected.
"""
import asyncio

import pytest
import uvicorn
from channels.db import database_sync_to_async
from django.contrib.auth.models import User
from websockets.asyncio.client import connect
from websockets.frames import Frame, Opcode

from app.chat import layer, revocation, wire
from app.chat.models import Room
from app.uvicorn_worker import ChatUvicornWorker


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_a_text_frame_is_websockets_own_framing_of_the_text(size):
    text = ("é" + "x" * size)[:size] if size else ""
    expected = Frame(Opcode.TEXT, text.encode()).serialize(mask=False, extensions=[])
    assert wire.text_frame(text) == expected
    assert wire.text_frame(text) == expected  # the memo returns the same bytes


def test_the_memo_is_by_identity_not_a_stale_frame():
    one, two = "".join(["a", "b"]), "".join(["a", "c"])
    assert wire.text_frame(one) != wire.text_frame(two)
    assert wire.text_frame(one) == Frame(Opcode.TEXT, b"ab").serialize(mask=False, extensions=[])


async def test_attach_leaves_the_scope_alone_for_any_other_server():
    async def send(message):
        pass

    scope = {"type": "websocket"}
    assert wire.attach(scope, send) is scope


def _uvicorn_config(app):
    kwargs = ChatUvicornWorker.CONFIG_KWARGS
    return uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off",
                          ws=kwargs["ws"], ws_per_message_deflate=kwargs["ws_per_message_deflate"])


@pytest.fixture
async def served():
    """A ChatConsumer behind a real Uvicorn server in this event loop, with
    the guard's attach() in front as in app/asgi.py."""
    from app.chat.consumers import ChatConsumer

    user = await database_sync_to_async(User.objects.create_user)("alice", password="pw-unused-123")
    room = await database_sync_to_async(Room.objects.create)(name="lobby")
    consumer_app = ChatConsumer.as_asgi()

    async def app(scope, receive, send):
        scope = dict(wire.attach(scope, send), user=user, url_route={"kwargs": {"room_id": room.pk}})
        return await consumer_app(scope, receive, send)

    server = uvicorn.Server(_uvicorn_config(app))
    server.install_signal_handlers = lambda: None  # the test runner keeps its own
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"ws://127.0.0.1:{port}/ws/rooms/{room.pk}/?after=0", user, server
    server.should_exit = True
    await asyncio.wait_for(task, 10)


async def _registered_consumer(user):
    for _ in range(200):
        consumers = revocation._by_user.get(user.pk)
        if consumers:
            (consumer,) = consumers
            if consumer.channel_name in layer._offers:
                return consumer
        await asyncio.sleep(0.01)
    raise AssertionError("the consumer never registered its offer")


@pytest.mark.django_db(transaction=True)
async def test_offered_frames_go_straight_to_a_real_uvicorn_connection_in_order(served):
    url, user, server = served
    event = {"type": "chat.message", "id": 1, "seq": 1, "html": "<article>one</article>", "at": None}
    async with connect(url, additional_headers={"Origin": "http://127.0.0.1"}, compression=None) as client:
        consumer = await _registered_consumer(user)
        assert consumer.wire is not None  # Uvicorn's send was found behind the scope
        (protocol,) = server.server_state.connections

        assert consumer.offer(event) is True
        assert consumer.outbox is None  # written at once: no outbox, no task
        assert await asyncio.wait_for(client.recv(), 5) == "<article>one</article>"

        # Flow control: while the transport is paused nothing is written
        # directly; the frames wait in the outbox, in order, and the regular
        # path writes them once the transport resumes.
        protocol.pause_writing()
        assert consumer.offer({**event, "seq": 2, "html": "<article>two</article>"}) is True
        assert consumer.offer({**event, "seq": 3, "html": "<article>three</article>"}) is True
        assert consumer.outbox is not None and len(consumer.outbox) == 2
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(client.recv(), 0.3)
        protocol.resume_writing()
        assert await asyncio.wait_for(client.recv(), 5) == "<article>two</article>"
        assert await asyncio.wait_for(client.recv(), 5) == "<article>three</article>"

        assert consumer.offer({**event, "seq": 4, "html": "<article>four</article>"}) is True
        assert await asyncio.wait_for(client.recv(), 5) == "<article>four</article>"
        the_wire = consumer.wire

    # The client closed: the wire refuses, and the connection got nothing more.
    for _ in range(200):
        if protocol.disconnected or protocol.conn.state is not wire.State.OPEN:
            break
        await asyncio.sleep(0.01)
    assert the_wire.write(wire.text_frame("<article>late</article>")) is False
