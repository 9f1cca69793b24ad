"""The handshake's one database hop (app/chat/consumers.py load_connect_state):
the room, the session's key and hash and the replay read together, after the
socket joined the room group, and the replay's message query skipped when the
room's last_seq says nothing can come after the cursor.

What must still hold: a message stored while the socket was joining is
replayed (the read comes after the join), and a handshake for a room that
does not exist, which now takes its socket slot and joins the group before
the read, gives both back."""
import pytest
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer

from app.chat import consumers, slots
from app.chat.models import Message
from tests.unit.test_consumer import _seq, communicator, make_user_and_room

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def message_reads(monkeypatch):
    """How many times the replay queried the messages (the real query runs)."""
    calls = []
    original = consumers.stored_after

    def counted(*args):
        calls.append(args)
        return original(*args)

    monkeypatch.setattr(consumers, "stored_after", counted)
    return calls


async def test_no_message_query_when_nothing_can_follow_the_cursor(message_reads):
    alice, room = await make_user_and_room("alice")
    for n in range(2):
        await database_sync_to_async(Message.objects.create)(room=room, author=alice, body=f"m{n}")
    for query in ("", "after=2", "after=99"):  # no cursor; at last_seq; beyond it
        comm = communicator(room.pk, alice, query=query)
        assert (await comm.connect())[0]
        assert await comm.receive_nothing(timeout=0.05)
        await comm.disconnect()
    assert message_reads == []
    # Positive control: a cursor below last_seq reads and replays.
    comm = communicator(room.pk, alice, query="after=1")
    assert (await comm.connect())[0]
    assert _seq(await comm.receive_from()) == 2
    await comm.disconnect()
    assert len(message_reads) == 1


async def test_a_message_stored_while_the_socket_joins_is_replayed(monkeypatch):
    """Stored (and published, to a group this socket is not in yet) just
    before the join: only the replay can deliver it, and it must, although
    the client's cursor was at the room's newest message when it connected."""
    alice, room = await make_user_and_room("alice")
    await database_sync_to_async(Message.objects.create)(room=room, author=alice, body="seen")
    layer = get_channel_layer()
    original = layer.group_add

    async def store_then_join(group, channel):
        await database_sync_to_async(Message.objects.create)(room=room, author=alice, body="during the join")
        return await original(group, channel)

    monkeypatch.setattr(layer, "group_add", store_then_join)
    comm = communicator(room.pk, alice, query="after=1")
    assert (await comm.connect())[0]
    frame = await comm.receive_from()
    assert "during the join" in frame and _seq(frame) == 2
    await comm.disconnect()


async def test_an_unknown_room_gives_back_the_slot_and_the_group(settings):
    settings.CHAT_MAX_SOCKETS_PER_USER = 1
    alice, room = await make_user_and_room("alice")
    layer = get_channel_layer()
    groups_before = len(layer.groups)
    for _ in range(3):
        comm = communicator(room.pk + 1000, alice)
        assert not (await comm.connect())[0]
    assert slots.held_here() == 0
    assert len(layer.groups) == groups_before
    comm = communicator(room.pk, alice)  # the one slot is free
    assert (await comm.connect())[0]
    await comm.disconnect()
