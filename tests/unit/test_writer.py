"""The batch writer and per-socket delivery bookkeeping, in process (SQLite).

The same writer runs one PostgreSQL statement per batch in production; that
path is tested against a real PostgreSQL in tests/integration/test_ordering.py.
"""
import asyncio

import pytest
from channels.db import database_sync_to_async
from django.contrib.auth.models import User

from app.chat.delivery import Delivered
from app.chat.models import Message, Room
from app.chat.writer import RoomGone, store_message


def test_delivered_keeps_a_watermark_below_the_first_gap():
    d = Delivered(5)
    assert not d.add(5) and not d.add(3)  # at or below the watermark: already sent
    assert d.add(7) and d.upto == 5 and 7 in d  # 7 before 6: the watermark waits for 6
    assert not d.add(7)
    assert d.add(6) and d.upto == 7 and not d.above
    assert d.add(9) and d.add(10)
    assert d.advance_to(12)  # 8, 11 and 12 were never sent: the client must be told
    assert d.upto == 12 and not d.above
    assert d.add(13) and not d.advance_to(13)  # everything up to 13 was sent: nothing to tell
    assert d.add(15) and d.advance_to(14)  # 14 skipped
    assert d.upto == 15 and not d.above


@database_sync_to_async
def _setup():
    alice = User.objects.create_user("alice", password="pw-unused-123")
    bob = User.objects.create_user("bob", password="pw-unused-123")
    gone_user = User.objects.create_user("gone", password="pw-unused-123")
    lobby = Room.objects.create(name="lobby")
    other = Room.objects.create(name="other")
    gone_room = Room.objects.create(name="gone")
    return alice, bob, gone_user, lobby, other, gone_room


@database_sync_to_async
def _stored():
    return sorted(Message.objects.values_list("room__name", "seq", "body"))


@pytest.mark.django_db(transaction=True)
async def test_seqs_count_up_per_room_in_one_batch():
    alice, bob, _, lobby, other, _ = await _setup()
    messages = await asyncio.gather(*(store_message(room.pk, alice.pk, f"m{n}")
                                      for n, room in enumerate([lobby, other, lobby, lobby, other])))
    assert [m.seq for m in messages] == [1, 1, 2, 3, 2]
    assert all(m.pk for m in messages)
    later = await store_message(lobby.pk, bob.pk, "later")
    assert later.seq == 4
    assert await database_sync_to_async(lambda: Room.objects.get(pk=lobby.pk).last_seq)() == 4


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("poison", ["deleted room", "deleted author"])
async def test_a_bad_row_fails_alone(poison):
    """Messages arriving together share one batch; one that cannot be stored
    (its room or its author was deleted meanwhile) must not take the others'
    with it."""
    alice, bob, gone_user, lobby, other, gone_room = await _setup()
    room_id, author_id = (gone_room.pk, alice.pk) if poison == "deleted room" else (lobby.pk, gone_user.pk)
    await database_sync_to_async((gone_room if poison == "deleted room" else gone_user).delete)()
    results = await asyncio.gather(
        store_message(lobby.pk, alice.pk, "before"),
        store_message(room_id, author_id, "poison"),
        store_message(other.pk, bob.pk, "unrelated"),
        store_message(lobby.pk, bob.pk, "after"),
        return_exceptions=True,
    )
    assert isinstance(results[1], RoomGone if poison == "deleted room" else Exception), results
    assert not any(isinstance(r, BaseException) for n, r in enumerate(results) if n != 1), results
    assert await _stored() == [("lobby", 1, "before"), ("lobby", 2, "after"), ("other", 1, "unrelated")]


@pytest.mark.django_db(transaction=True)
async def test_a_sender_goes_on_from_the_commit_not_from_the_database_threads_way_back(monkeypatch):
    """store_message returns once the batch is committed, settled by a callback
    the database thread schedules right after the commit; it does not wait for
    the thread's own return (asgiref's close_old_connections, its executor
    future and shield, the writer task: three more turns of a busy event loop).
    Here the thread is held in that way back: the message is still returned,
    stored and numbered. Positive control: the thread really was held until
    released, and the next batch is written once it is."""
    import threading

    import channels.db

    alice, _bob, _gone_user, lobby, _other, _gone_room = await _setup()
    release, held = threading.Event(), threading.Event()
    original = channels.db.close_old_connections
    calls = {"n": 0}

    def slow_way_back():
        calls["n"] += 1
        if calls["n"] == 2:  # the second call: after the INSERT, on the way back
            held.set()
            release.wait(10)
        return original()

    monkeypatch.setattr(channels.db, "close_old_connections", slow_way_back)
    message = await asyncio.wait_for(store_message(lobby.pk, alice.pk, "first"), 5)
    assert message.seq == 1 and message.pk is not None
    # The thread reaches its way back just after the commit that settled the message.
    assert await asyncio.get_running_loop().run_in_executor(None, held.wait, 5)
    assert not release.is_set()
    later = asyncio.ensure_future(store_message(lobby.pk, alice.pk, "second"))
    await asyncio.sleep(0.2)
    assert not later.done()  # the writer's one thread is still held
    release.set()
    assert (await asyncio.wait_for(later, 5)).seq == 2
    bodies = await database_sync_to_async(lambda: list(Message.objects.order_by("seq").values_list("body", flat=True)))()
    assert bodies == ["first", "second"]


@pytest.mark.django_db(transaction=True)
async def test_a_message_is_written_only_after_its_admission_says_yes_and_holds_nobody_else():
    """store_message's admission (the per-user budget, asked while the message
    waits for the writer): a no is never written and its sender learns why; a
    message still waiting for its answer holds no other sender's message; a
    yes is written when it comes. Positive control: a message without an
    admission is written at once."""
    from app.chat.writer import NotAdmitted

    alice, bob, _gone_user, lobby, _other, _gone_room = await _setup()
    loop = asyncio.get_running_loop()
    slow, refused = loop.create_future(), loop.create_future()
    refused.set_result("rate_limited")
    waiting = asyncio.ensure_future(store_message(lobby.pk, alice.pk, "waits for its answer", slow))
    no = asyncio.ensure_future(store_message(lobby.pk, alice.pk, "over the budget", refused))
    free = await asyncio.wait_for(store_message(lobby.pk, bob.pk, "no admission"), 5)
    assert free.seq == 1
    with pytest.raises(NotAdmitted) as refusal:
        await asyncio.wait_for(no, 5)
    assert refusal.value.reason == "rate_limited"
    await asyncio.sleep(0.2)
    assert not waiting.done()
    slow.set_result(None)
    assert (await asyncio.wait_for(waiting, 5)).seq == 2
    bodies = await database_sync_to_async(lambda: list(Message.objects.order_by("seq").values_list("body", flat=True)))()
    assert bodies == ["no admission", "waits for its answer"]


@pytest.mark.django_db(transaction=True)
async def test_an_admission_that_fails_fails_only_its_message():
    alice, bob, _gone_user, lobby, _other, _gone_room = await _setup()
    loop = asyncio.get_running_loop()
    broken, fine = loop.create_future(), loop.create_future()
    broken.set_exception(RuntimeError("the budget's store blew up"))
    fine.set_result(None)
    results = await asyncio.gather(store_message(lobby.pk, alice.pk, "broken", broken),
                                   store_message(lobby.pk, bob.pk, "fine", fine), return_exceptions=True)
    assert isinstance(results[0], RuntimeError) and results[1].seq == 1


def test_the_goodbye_check_works_above_select_fd_setsize():
    """app/chat/writer.py's check for a connection the server closed: a worker
    with thousands of sockets hands out descriptors above 1024, where
    select.select() raises ValueError."""
    import os
    import resource
    import socket

    from app.chat.writer import _readable

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft <= 1500:  # a shell's default of 1024: raise it (root and CI have a higher hard limit)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    a, b = socket.socketpair()
    high = os.dup2(a.fileno(), 1500)
    try:
        assert not _readable(high)
        b.send(b"x")  # the peer said something: readable
        assert _readable(high)
        b.close()
        assert _readable(high)  # and a closed peer too (EOF)
    finally:
        os.close(high)
        a.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
