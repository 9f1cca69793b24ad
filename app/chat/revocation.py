"""A revoked session, user or room loses its open sockets, on every worker and host.

What closes a socket, and how (the page shows the error frame and stops
reconnecting: app/chat/static/chat/room.js):

| event | close code | error frame |
|---|---|---|
| logout (that browser's session) | 4401 | `signed_out` |
| password changed, user deleted, session deleted or expired | 4401 | `signed_out` |
| `is_active=False` | 4403 | `account_disabled` |
| room deleted | 4404 | `room_deleted` |

How the news travels: app/chat/signals.py hears Django's signals (logout,
a user saved with another password or `is_active`, a user or a room deleted)
and, once the transaction commits, `publish`es an event on the channel layer
group GROUP. The channel layer is Redis, so every worker of every host gets
it: each worker runs one listener (a channel of its own in GROUP, not one
subscription per socket) and acts on its own sockets only:

* a logout names the session (by a hash of its key, never the key itself):
  its sockets close at once (the signal fires before the session is deleted);
* a user or room event makes the worker re-check that user's or room's
  sockets against the database, which decides the close code.

The backstop for whatever bypasses the signals (a session deleted straight
from the database, `QuerySet.update(is_active=False)`, raw SQL, an event lost
while Redis was down): every CHAT_SESSION_RECHECK_INTERVAL seconds each worker
re-checks all its sockets with three queries (sessions still there and not
expired; users still there, active, with the password the session was made
with; rooms still there).

A socket's identity (user, session, session hash, room) is read once at the
handshake (app/chat/consumers.py); nothing here runs per message.
"""
from __future__ import annotations

import asyncio
import contextvars
import hashlib
import logging
from importlib import import_module

from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async

log = logging.getLogger(__name__)

GROUP = "chat.revocations"
PUBLISH_TIMEOUT = 2.0
LISTEN_RETRY = 2.0
CHUNK = 2000  # keys per IN (...) of the re-check

# reason -> (close code, error frame text)
CLOSE = {
    "signed_out": (4401, "You were signed out. Sign in again to keep chatting."),
    "account_disabled": (4403, "Your account was disabled."),
    "room_deleted": (4404, "This room was deleted."),
}


def session_tag(session_key: str | None) -> str | None:
    """What events carry instead of a session key (a key is a credential)."""
    if not session_key:
        return None
    return hashlib.sha256(f"chat-session:{session_key}".encode()).hexdigest()[:32]


# --- this process's sockets -------------------------------------------------------

_by_user: dict[int, set] = {}
_by_session: dict[str, set] = {}
_by_room: dict[int, set] = {}
_state: dict = {"loop": None, "listener": None, "periodic": None, "channel": None, "passes": 0, "closed": 0}


def _index(consumer):
    return ((_by_user, consumer.user_id), (_by_session, consumer.session_tag), (_by_room, consumer.room.pk))


def register(consumer) -> None:
    """A socket that is open (or opening): it can be revoked from now on.
    The consumer has user_id, session_key, session_tag, session_hash, room
    and an async `revoke(reason)`."""
    for table, key in _index(consumer):
        if key is not None:
            table.setdefault(key, set()).add(consumer)
    _ensure_tasks()


def unregister(consumer) -> None:
    if getattr(consumer, "user_id", None) is None or getattr(consumer, "room", None) is None:
        return
    for table, key in _index(consumer):
        members = table.get(key)
        if members is not None:
            members.discard(consumer)
            if not members:
                del table[key]
    if not _by_user:
        _stop_tasks()  # nothing left to revoke here; the next socket starts them again


def local_sockets() -> int:
    return sum(len(m) for m in _by_user.values())


def _ensure_tasks() -> None:
    loop = asyncio.get_running_loop()
    if _state["loop"] is not loop:
        _state.update(loop=loop, listener=None, periodic=None, channel=None)
    for name, factory in (("listener", _listen), ("periodic", _every)):
        task = _state[name]
        if task is None or task.done():
            # A context of its own: not the one of the consumer that happened
            # to start it (its thread-sensitive executor goes away with it).
            _state[name] = loop.create_task(factory(), context=contextvars.Context())


def _stop_tasks() -> None:
    for name in ("listener", "periodic"):
        task = _state[name]
        if task is not None and not task.done():
            task.cancel()
        _state[name] = None
    _state["channel"] = None


# --- the listener -----------------------------------------------------------------------


async def _listen() -> None:
    from channels.layers import get_channel_layer

    layer = get_channel_layer()
    channel = None
    try:
        while True:
            try:
                if channel is None:
                    channel = await layer.new_channel("chat.revoke.")
                await layer.group_add(GROUP, channel)
                _state["channel"] = channel
                while True:
                    await handle(await layer.receive(channel))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis away: listen again shortly (the periodic re-check covers the gap)
                log.warning("revocation listener: %s: %s; retrying in %.0fs", type(exc).__name__, exc, LISTEN_RETRY)
                _state["channel"] = None
                await asyncio.sleep(LISTEN_RETRY)
    finally:
        # Stopped (no sockets left here): leave the group, or every stop and
        # start would leave one more member behind.
        if channel is not None:
            try:
                await asyncio.wait_for(layer.group_discard(GROUP, channel), PUBLISH_TIMEOUT)
            except BaseException:  # noqa: BLE001 - best effort on the way out
                pass


async def handle(event: dict) -> int:
    """Act on one event on this process's sockets; returns how many closed."""
    closed = 0
    tag = event.get("session")
    if tag:
        for consumer in list(_by_session.get(tag, ())):
            closed += await _close(consumer, "signed_out")
    suspects = set()
    if event.get("user") is not None:
        suspects |= _by_user.get(event["user"], set())
    if event.get("room") is not None:
        suspects |= _by_room.get(event["room"], set())
    if suspects:
        closed += await recheck(list(suspects))
    return closed


async def _close(consumer, reason: str) -> int:
    try:
        return int(await consumer.revoke(reason))
    except Exception:  # the socket went away meanwhile
        log.debug("revoking a socket failed", exc_info=True)
        return 0


# --- the re-check -------------------------------------------------------------------------


async def recheck(consumers) -> int:
    """Close those of `consumers` whose session, user or room is no longer
    valid (database truth); returns how many closed. If the database cannot
    be read nobody is closed (the next pass tries again)."""
    if not consumers:
        return 0
    idents = [(c.session_key, c.user_id, c.session_hash, c.room.pk) for c in consumers]
    try:
        verdicts = await _verdicts(idents)
    except Exception as exc:
        log.warning("session re-check failed (%s); trying again next pass", type(exc).__name__)
        return 0
    closed = 0
    for consumer, reason in zip(consumers, verdicts):
        if reason is not None:
            closed += await _close(consumer, reason)
    _state["closed"] += closed
    return closed


def _chunks(values):
    values = list(values)
    for i in range(0, len(values), CHUNK):
        yield values[i:i + CHUNK]


def _live_sessions(keys: set[str]) -> set[str]:
    from django.conf import settings
    from django.utils import timezone

    store = import_module(settings.SESSION_ENGINE).SessionStore
    if hasattr(store, "get_model_class"):  # db and cached_db: batched, straight from the table
        model, now, live = store.get_model_class(), timezone.now(), set()
        for chunk in _chunks(keys):
            live.update(model.objects.filter(session_key__in=chunk, expire_date__gt=now)
                        .values_list("session_key", flat=True))
        return live
    live = set()
    for key in keys:  # any other engine: its own load() says whether the session is there
        session = store(session_key=key)
        session.load()
        if session.session_key is not None:
            live.add(key)
    return live


def _hash_matches(user, session_hash) -> bool:
    from django.utils.crypto import constant_time_compare

    if not session_hash or not hasattr(user, "get_session_auth_hash"):
        return False
    if constant_time_compare(session_hash, user.get_session_auth_hash()):
        return True
    return any(constant_time_compare(session_hash, h) for h in user.get_session_auth_fallback_hash())


@database_sync_to_async
def _verdicts(idents) -> list[str | None]:
    from django.contrib.auth import get_user_model

    from app.chat.models import Room

    user_model = get_user_model()
    sessions = _live_sessions({key for key, _, _, _ in idents if key})
    users = {}
    for chunk in _chunks({uid for _, uid, _, _ in idents}):
        users.update((u.pk, u) for u in user_model._default_manager.filter(pk__in=chunk))
    rooms = set()
    for chunk in _chunks({rid for _, _, _, rid in idents}):
        rooms.update(Room.objects.filter(pk__in=chunk).values_list("pk", flat=True))
    out = []
    for key, uid, session_hash, room_id in idents:
        user = users.get(uid)
        if user is None or key not in sessions or not _hash_matches(user, session_hash):
            out.append("signed_out")
        elif not getattr(user, "is_active", True):
            out.append("account_disabled")
        elif room_id not in rooms:
            out.append("room_deleted")
        else:
            out.append(None)
    return out


async def _every() -> None:
    from django.conf import settings

    from channels.layers import get_channel_layer

    while True:
        await asyncio.sleep(settings.CHAT_SESSION_RECHECK_INTERVAL)
        channel = _state["channel"]
        if channel is not None:
            try:
                # The core layer forgets a group member after a day (group_expiry).
                await get_channel_layer().group_add(GROUP, channel)
            except Exception as exc:
                log.warning("revocation listener not re-joined (%s)", type(exc).__name__)
        everyone = {c for members in _by_user.values() for c in members}
        await recheck(list(everyone))
        _state["passes"] += 1


# --- telling every worker ------------------------------------------------------------------


async def apublish(event: dict) -> None:
    """Tell every worker (async code). Raises if the channel layer cannot."""
    from channels.layers import get_channel_layer

    layer = get_channel_layer()
    if layer is None:
        return
    from app.chat.fan_out import fan_out

    await asyncio.wait_for(fan_out(layer, GROUP, {"type": "chat.revoke", **event}), PUBLISH_TIMEOUT)


def publish(event: dict) -> None:
    """Tell every worker (sync code: signals, views, management commands).
    Never raises: if Redis is down the periodic re-check closes the sockets."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        in_loop = False
    else:
        in_loop = True
    try:
        if in_loop:  # called from async code on the loop's thread: do not block it
            asyncio.get_running_loop().create_task(_publish_logged(event), context=contextvars.Context())
        else:
            async_to_sync(apublish)(event)
    except Exception as exc:
        _not_broadcast(exc)


async def _publish_logged(event: dict) -> None:
    try:
        await apublish(event)
    except Exception as exc:
        _not_broadcast(exc)


def _not_broadcast(exc: Exception) -> None:
    log.warning("revocation not broadcast (%s: %s); the periodic re-check closes the sockets",
                type(exc).__name__, exc)
