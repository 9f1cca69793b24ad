"""Per-user limits and revocation, through the whole `app.asgi.application`
(in-memory channel layer, in-process counts; tests/faults/test_user_limits.py
and test_revocation.py run them on the production stack, across workers and
hosts).

Every socket carries the session cookie of a real login (Client.force_login
writes a database session), so the only thing that can close it is the
protection under test; each refusal has a positive control beside it.
"""
from __future__ import annotations

import asyncio
import re
import secrets

import pytest
from asgiref.sync import sync_to_async
from channels.testing import HttpCommunicator, WebsocketCommunicator
from django.conf import settings
from django.contrib.auth.models import User
from django.contrib.sessions.models import Session
from django.test import Client

from app.asgi import application
from app.chat import revocation, slots
from app.chat.models import Message, Room

pytestmark = pytest.mark.django_db(transaction=True)

SITE = "chat.example.com"
ERROR = re.compile(r'data-error="([a-z_]+)"')


@sync_to_async
def account(name=None):
    user = User.objects.create_user(name or f"u-{secrets.token_hex(3)}", password="pw-unused-123")
    return user


@sync_to_async
def session_of(user) -> str:
    client = Client(HTTP_HOST=SITE)
    client.force_login(user)
    return client.cookies[settings.SESSION_COOKIE_NAME].value


@sync_to_async
def room_of(owner=None, name=None) -> int:
    return Room.objects.create(name=name or f"room {secrets.token_hex(3)}", created_by=owner).pk


class Socket:
    def __init__(self, comm):
        self.comm = comm
        self.frames: list[str] = []

    async def say(self, text):
        await self.comm.send_to(text_data=f'{{"message": "{text}"}}')

    async def next(self, timeout=2.0) -> dict:
        return await self.comm.receive_output(timeout)

    async def ended(self, timeout=3.0) -> tuple[str | None, int | None]:
        """(error code of the last error frame, close code) once the server closes."""
        error = None
        while True:
            out = await self.comm.receive_output(timeout)
            if out["type"] == "websocket.send":
                m = ERROR.search(out.get("text") or "")
                if m:
                    error = m.group(1)
            elif out["type"] == "websocket.close":
                return error, out.get("code")

    async def close(self):
        await self.comm.disconnect()


async def open_socket(session, room_id, address="198.51.100.7") -> tuple[Socket, bool]:
    headers = [(b"host", SITE.encode()), (b"origin", f"https://{SITE}".encode()), (b"x-forwarded-proto", b"https"),
               (b"cookie", f"{settings.SESSION_COOKIE_NAME}={session}".encode())]
    comm = WebsocketCommunicator(application, f"/ws/rooms/{room_id}/", headers=headers)
    comm.scope.update(client=(address, 40000), scheme="wss")
    connected, _ = await comm.connect()
    sock = Socket(comm)
    if not connected:
        return sock, False
    # Accepted; a refusal after accept is an error frame and a close right away.
    if await comm.receive_nothing(0.15):
        return sock, True
    return sock, False


async def post(path, session, fields=None):
    """A form POST through the ASGI application, as the browser sends it."""
    token = secrets.token_hex(16)  # a 32-character CSRF secret, sent as cookie and field
    body = "&".join(f"{k}={v}" for k, v in {"csrfmiddlewaretoken": token, **(fields or {})}.items()).encode()
    headers = [(b"host", SITE.encode()), (b"origin", f"https://{SITE}".encode()), (b"x-forwarded-proto", b"https"),
               (b"content-type", b"application/x-www-form-urlencoded"),
               (b"cookie", f"{settings.SESSION_COOKIE_NAME}={session}; {settings.CSRF_COOKIE_NAME}={token}".encode())]
    comm = HttpCommunicator(application, "POST", path, body=body, headers=headers)
    comm.scope.update(client=("198.51.100.99", 40000), scheme="https")
    return await comm.get_response(timeout=10)


# --- sockets per user ------------------------------------------------------------------


async def test_sockets_per_user_refused_over_the_limit_and_freed_on_close(settings):
    settings.CHAT_MAX_SOCKETS_PER_USER = 3
    alice, bob = await account(), await account()
    session, room = await session_of(alice), await room_of()
    opened = [await open_socket(session, room) for _ in range(3)]
    assert [ok for _, ok in opened] == [True, True, True]
    extra, ok = await open_socket(session, room)
    assert not ok
    assert await extra.ended() == ("too_many_sockets", 1008)
    other_session = await session_of(alice)  # another browser of the same user counts too
    _, ok = await open_socket(other_session, room)
    assert not ok
    bob_socket, ok = await open_socket(await session_of(bob), room)
    assert ok  # positive control: another user
    await opened[0][0].close()
    again, ok = await open_socket(session, room)
    assert ok  # the slot closing freed is reusable
    for sock in [s for s, _ in opened[1:]] + [again, bob_socket]:
        await sock.close()
    assert slots.held_here() == 0


async def test_socket_limit_store_down_refuses_with_1013(settings):
    """Redis unreachable when the slot is taken: refused (never let through uncounted)."""
    from app.chat.consumers import ChatConsumer

    alice = await account()
    room = await room_of()
    settings.CHAT_LIMITS_REDIS_URL = "redis://127.0.0.1:1/0"
    comm = WebsocketCommunicator(ChatConsumer.as_asgi(), f"/ws/rooms/{room}/")
    comm.scope.update(user=alice, url_route={"kwargs": {"room_id": room}})
    connected, _ = await comm.connect()
    assert connected
    assert await Socket(comm).ended() == ("unavailable", 1013)


# --- messages per user -------------------------------------------------------------------


async def test_messages_per_user_share_one_bucket_across_sockets(settings):
    settings.CHAT_USER_RATE_BURST = 4
    settings.CHAT_USER_RATE_PER_SECOND = 0.1
    alice, bob = await account(), await account()
    room = await room_of()
    a1, _ = await open_socket(await session_of(alice), room)
    a2, _ = await open_socket(await session_of(alice), room)
    b, _ = await open_socket(await session_of(bob), room)
    answers = []
    for n in range(3):  # 6 messages over 2 sockets; each socket alone is under its own limit (10)
        for sock, name in ((a1, "a1"), (a2, "a2")):
            await sock.say(f"{name}-{n}")
            while True:  # the sender's own frame or an error (other sockets' copies are skipped)
                text = (await sock.next())["text"]
                if "data-error" in text or f"{name}-{n}" in text:
                    answers.append(text)
                    break
    assert sum('data-error="rate_limited"' in t for t in answers) == 2
    stored = await sync_to_async(lambda: Message.objects.filter(author=alice).count())()
    assert stored == 4
    await b.say("bob is not limited")  # positive control: another user
    for _ in range(10):
        text = (await b.next())["text"]
        if "bob is not limited" in text:
            break
    else:
        raise AssertionError("bob's message never came back")
    for sock in (a1, a2, b):
        await sock.close()


async def test_per_user_bucket_falls_back_to_the_process_when_redis_is_down(settings):
    """Redis unreachable: the budget is kept per process (not refused, not unlimited)."""
    from app.chat import throttle

    settings.CHAT_LIMITS_REDIS_URL = "redis://127.0.0.1:1/0"
    limit = throttle.Limit("unit-user", 3, 30)
    verdicts = [await throttle.ahit_or_local(limit, 42) for _ in range(5)]
    assert [v.allowed for v in verdicts] == [True, True, True, False, False]
    assert (await throttle.ahit_or_local(limit, 43)).allowed  # another user has its own


# --- revocation ------------------------------------------------------------------------


async def test_logout_closes_that_sessions_sockets_only():
    alice, bob = await account(), await account()
    room = await room_of()
    session, other_session = await session_of(alice), await session_of(alice)
    mine = [(await open_socket(session, room))[0] for _ in range(2)]
    elsewhere, _ = await open_socket(other_session, room)
    bobs, _ = await open_socket(await session_of(bob), room)
    response = await post("/accounts/logout/", session)
    assert response["status"] == 302
    for sock in mine:
        assert await sock.ended() == ("signed_out", 4401)
    # positive controls: the same user's other browser, another user
    assert await elsewhere.comm.receive_nothing(0.3) and await bobs.comm.receive_nothing(0.01)
    await elsewhere.close()
    await bobs.close()


@pytest.mark.parametrize("change, expected", [
    ("password", ("signed_out", 4401)),
    ("deactivate", ("account_disabled", 4403)),
    ("delete", ("signed_out", 4401)),
])
async def test_user_changes_close_that_users_sockets(change, expected):
    alice, bob = await account(), await account()
    room = await room_of()
    sock, _ = await open_socket(await session_of(alice), room)
    bobs, _ = await open_socket(await session_of(bob), room)

    def apply():
        user = User.objects.get(pk=alice.pk)
        if change == "password":
            user.set_password("a-new-password-456")
            user.save()
        elif change == "deactivate":
            user.is_active = False
            user.save()
        else:
            user.delete()

    await sync_to_async(apply)()
    assert await sock.ended() == expected
    assert await bobs.comm.receive_nothing(0.3)  # positive control
    await bobs.close()


async def test_saving_a_user_without_credential_changes_closes_nothing():
    alice = await account()
    room = await room_of()
    sock, _ = await open_socket(await session_of(alice), room)

    def touch():
        user = User.objects.get(pk=alice.pk)
        user.first_name = "Alice"
        user.save()
        user.save(update_fields=["last_login"])

    await sync_to_async(touch)()
    assert await sock.comm.receive_nothing(0.3)
    await sock.close()


async def test_room_deleted_by_its_owner_closes_its_sockets():
    owner, other = await account(), await account()
    room, other_room = await room_of(owner), await room_of(owner)
    owner_session, other_session = await session_of(owner), await session_of(other)
    inside, _ = await open_socket(other_session, room)
    next_door, _ = await open_socket(other_session, other_room)
    refused = await post(f"/rooms/{room}/delete/", other_session)
    assert refused["status"] == 403  # not the owner: nothing happens
    assert await inside.comm.receive_nothing(0.2)
    response = await post(f"/rooms/{room}/delete/", owner_session)
    assert response["status"] == 302
    assert await inside.ended() == ("room_deleted", 4404)
    assert await next_door.comm.receive_nothing(0.3)  # positive control: another room
    await next_door.close()


async def test_a_revoked_socket_stores_nothing_more():
    alice = await account()
    room = await room_of()
    sock, _ = await open_socket(await session_of(alice), room)
    consumers = list(revocation._by_user[alice.pk])
    await consumers[0].revoke("signed_out")
    await sock.say("after the revocation")  # reaches the consumer before the client sees the close
    assert await sock.ended() == ("signed_out", 4401)
    await asyncio.sleep(0.5)  # time enough to store it, were it stored
    assert await sync_to_async(Message.objects.count)() == 0


async def test_the_periodic_recheck_closes_what_no_signal_announced(settings):
    """A session row deleted straight from the table, `QuerySet.update(is_active=False)`,
    a room deleted with raw SQL: no signal fires; the re-check finds them."""
    from django.db import connection

    settings.CHAT_SESSION_RECHECK_INTERVAL = 0.5
    gone_session, inactive, keeper = await account(), await account(), await account()
    room, doomed_room = await room_of(), await room_of()
    session = await session_of(gone_session)
    a, _ = await open_socket(session, room)
    b, _ = await open_socket(await session_of(inactive), room)
    c, _ = await open_socket(await session_of(keeper), doomed_room)
    d, _ = await open_socket(await session_of(keeper), room)

    def bypass():
        User.objects.filter(pk=inactive.pk).update(is_active=False)
        with connection.cursor() as cursor:
            cursor.execute("DELETE FROM django_session WHERE session_key = %s", [session])
            cursor.execute("DELETE FROM chat_message WHERE room_id = %s", [doomed_room])
            cursor.execute("DELETE FROM chat_room WHERE id = %s", [doomed_room])

    await sync_to_async(bypass)()
    assert await a.ended() == ("signed_out", 4401)
    assert await b.ended() == ("account_disabled", 4403)
    assert await c.ended() == ("room_deleted", 4404)
    assert await d.comm.receive_nothing(1.2)  # positive control: two passes, still open
    await d.close()


async def test_expired_session_is_closed_by_the_recheck(settings):
    from django.utils import timezone

    settings.CHAT_SESSION_RECHECK_INTERVAL = 0.5
    alice = await account()
    room = await room_of()
    session = await session_of(alice)
    sock, _ = await open_socket(session, room)
    await sync_to_async(lambda: Session.objects.filter(session_key=session).update(
        expire_date=timezone.now() - timezone.timedelta(seconds=1)))()
    assert await sock.ended() == ("signed_out", 4401)



def test_logout_and_credential_changes_work_while_redis_is_down(settings, caplog):
    """The broadcast fails (Redis unreachable): the logout and the save still
    succeed, a warning says the periodic re-check will close the sockets."""
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
                                           "CONFIG": {"hosts": ["redis://127.0.0.1:1/0"]}}}
    user = User.objects.create_user("offline", password="pw-unused-123")
    client = Client(HTTP_HOST=SITE)
    client.force_login(user)
    assert client.post("/accounts/logout/", secure=True).status_code == 302
    user.set_password("another-password-789")
    user.save()
    warnings = [r.getMessage() for r in caplog.records if r.name == "app.chat.revocation"]
    assert len(warnings) == 2 and all("periodic re-check" in w for w in warnings), warnings
