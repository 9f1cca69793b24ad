"""Trips to the worker's one database thread when a chat socket opens and
closes (app/chat/db_hops.py): only the ones that do work.

Under issue #13's churn soak the sockets queued for that thread, most of them
for Channels' `aclose_old_connections()`, and the workers' RSS grew with the
queue. Counted here at the one door every hop goes through
(asgiref's SyncToAsync.__call__), with a positive control: Channels' own
consumer, counted the same way, makes the hops the chat consumer skips."""
import pytest
from asgiref.sync import SyncToAsync
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from channels.testing import WebsocketCommunicator

from tests.unit.test_consumer import communicator, make_user_and_room

pytestmark = pytest.mark.django_db(transaction=True)

# The chat consumer's handshake: one hop for the room, the session's key and
# hash and the replay (load_connect_state). The session and the user are read
# by Channels' AuthMiddleware before the consumer runs (not in these tests' scope).
WORK = ["load_connect_state"]
# Channels' idle hop, `sync_to_async(close_old_connections)`; its communicator
# swaps close_old_connections for `no_op` while it passes a message in or out.
IDLE = ("close_old_connections", "no_op")


def idle(hops) -> int:
    return sum(1 for name in hops if name in IDLE)


@pytest.fixture
def hops(monkeypatch):
    """Names of the functions run on a sync thread (the database thread) from now on."""
    seen = []
    original = SyncToAsync.__call__

    async def counted(self, *args, **kwargs):
        seen.append(getattr(self.func, "__name__", repr(self.func)))
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(SyncToAsync, "__call__", counted)
    return seen


async def test_open_and_close_make_only_the_hops_that_do_work(hops):
    alice, room = await make_user_and_room("alice")
    hops.clear()
    comm = communicator(room.pk, alice, query="after=0")
    assert (await comm.connect())[0]
    await comm.disconnect()
    assert idle(hops) == 0
    assert hops == WORK


async def test_channels_own_consumer_makes_the_idle_hops(hops):
    """Positive control: the counter sees Channels' hops (one before connect,
    two around disconnect), so the test above cannot pass by not counting."""

    class Plain(AsyncWebsocketConsumer):
        pass

    comm = WebsocketCommunicator(Plain.as_asgi(), "/ws/plain/")
    assert (await comm.connect())[0]
    await comm.disconnect()
    assert idle(hops) == 3


async def test_database_sync_to_async_still_closes_old_connections(monkeypatch):
    """What makes the skipped hops redundant: every database_sync_to_async
    call runs close_old_connections() before and after, on its own thread."""
    import channels.db

    calls = []
    monkeypatch.setattr(channels.db, "close_old_connections", lambda: calls.append(1))
    assert await database_sync_to_async(lambda: 42)() == 42
    assert len(calls) == 2


async def test_many_opens_and_closes_leave_nothing_registered(hops):
    """The per-socket registries come back to empty after a churn of sockets
    (revocation, resync, socket slots, the channel layer's groups and channels)."""
    from channels.layers import get_channel_layer

    from app.chat import resync, revocation, slots

    alice, room = await make_user_and_room("alice")
    layer = get_channel_layer()
    groups_before, channels_before = len(layer.groups), len(layer.channels)
    for _ in range(20):
        comm = communicator(room.pk, alice, query="after=0")
        assert (await comm.connect())[0]
        await comm.disconnect()
    assert revocation.local_sockets() == 0 and not revocation._by_session and not revocation._by_room
    assert resync.local_sockets() == 0
    assert slots.held_here() == 0
    assert (len(layer.groups), len(layer.channels)) == (groups_before, channels_before)
    assert idle(hops) == 0


async def test_a_received_frame_and_a_delivered_message_make_no_idle_hop(hops):
    """The per-frame handlers (websocket.receive, and chat.message through the
    channel queue, as the in-memory layer delivers it) skip Channels' hop too:
    a message costs its INSERT and nothing else on the database thread."""
    import json

    alice, room = await make_user_and_room("alice")
    sender, reader = communicator(room.pk, alice, query="after=0"), communicator(room.pk, alice, query="after=0")
    assert (await sender.connect())[0] and (await reader.connect())[0]
    hops.clear()
    await sender.send_to(text_data=json.dumps({"message": "hello"}))
    assert "hello" in await reader.receive_from()
    assert "hello" in await sender.receive_from()
    assert idle(hops) == 0, hops
    assert hops == ["_insert"], hops
    await sender.disconnect()
    await reader.disconnect()
