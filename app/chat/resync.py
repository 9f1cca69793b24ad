"""Catch-up after the channel layer's Redis connection comes back.

Redis PubSub keeps nothing: whatever is published while a worker's
subscription is down (Redis restarted, connection cut) never reaches that
worker's sockets, and a `group_send` that fails while Redis is down reaches
nobody. Every message is stored before it is published, so the database
knows what was missed:

* the channel layer's connection pool is built with `redis_connect_func=on_redis_connect`
  (settings: CHAT_RESYNC_ON_REDIS_RECONNECT). redis-py calls it on every
  connect; on a *re*-connect of a connection it schedules a resync. redis-py's
  PubSub re-subscribes to every channel by itself right after this function
  returns, so the resync waits RESYNC_DELAY before it reads the database:
  anything published after that read arrives live.
* the resync reads, with one query per room that has sockets in this
  process, the newest CHAT_RESYNC_LIMIT messages after the lowest watermark
  of those sockets, and every socket sends the ones it has not sent yet
  (app/chat/delivery.py); then each socket's watermark moves to the last seq
  read. That is exact, not a guess: a room's seqs are gap-free and commit in
  order (app/chat/writer.py), so the read holds every stored message up to
  its last seq, and one still being written has a higher seq and is read by
  the next pass (or arrives live).
* every CHAT_RESYNC_INTERVAL seconds the same resync runs anyway: a worker
  killed between storing a message and publishing it (SIGKILL, OOM) leaves a
  stored message nobody was told about, and worker B may publish seq 100
  while worker A's 99 is lost; the next periodic pass sends it. Each pass
  reads only messages after the watermarks the previous one left.
* it also drops PubSub subscriptions nobody uses any more (an unsubscribe
  that failed while Redis was down would otherwise be re-subscribed on every
  reconnect and accumulate).

Sockets stay open through a Redis restart: no reconnect storm, no lost
frames, and the page needs no special handling.
"""
from __future__ import annotations

import asyncio
import contextvars
import logging
import time

log = logging.getLogger(__name__)

RESYNC_DELAY = 0.5  # seconds: let the PubSub re-subscribe before reading the database
RETRY_DELAY = 2.0
MAX_ATTEMPTS = 90  # ~3 minutes of retries; after that the next periodic pass (or reconnect) tries again

_rooms: dict[int, set] = {}
_state: dict = {"task": None, "again": False, "runs": 0, "last": None, "periodic": None}


def register(consumer) -> None:
    _rooms.setdefault(consumer.room.pk, set()).add(consumer)
    periodic = _state["periodic"]
    if periodic is None or periodic.done():
        from django.conf import settings

        if settings.CHAT_RESYNC_INTERVAL > 0:
            _state["periodic"] = _detached(_every(settings.CHAT_RESYNC_INTERVAL))


async def _every(interval: float) -> None:
    while _rooms:
        await asyncio.sleep(interval)
        schedule()


def unregister(consumer) -> None:
    room = getattr(consumer, "room", None)
    if room is None:
        return
    members = _rooms.get(room.pk)
    if members is not None:
        members.discard(consumer)
        if not members:
            del _rooms[room.pk]


def local_sockets() -> int:
    return sum(len(m) for m in _rooms.values())


async def on_redis_connect(connection) -> None:
    """`redis_connect_func` for the channel layer's pool: the normal handshake,
    then a resync if this connection had been connected before."""
    await connection.on_connect()
    if getattr(connection, "_chat_was_connected", False):
        schedule()
    connection._chat_was_connected = True


def schedule() -> None:
    task = _state["task"]
    if task is not None and not task.done():
        _state["again"] = True  # a connection came back during a resync: run once more
        return
    _state["task"] = _detached(_run())


def _detached(coro) -> asyncio.Task:
    """A task that belongs to no request: a task copies the current context,
    and the context of the consumer that happened to trigger it carries that
    consumer's thread-sensitive executor, which is gone once it disconnects."""
    return asyncio.get_running_loop().create_task(coro, context=contextvars.Context())


async def _run() -> None:
    attempts = 0
    while True:
        _state["again"] = False
        await asyncio.sleep(RESYNC_DELAY)
        attempts += 1
        try:
            await prune_subscriptions()
            started = time.monotonic()
            rooms, sent = await resync_all()
        except Exception as exc:  # the database or Redis is still away: try again shortly
            if attempts >= MAX_ATTEMPTS:
                log.error("resync gave up after %d attempts (%s)", attempts, type(exc).__name__)
                return
            log.warning("resync failed (%s: %s); retrying in %.0fs", type(exc).__name__, exc, RETRY_DELAY)
            await asyncio.sleep(RETRY_DELAY)
            _state["again"] = True
        else:
            _state["runs"] += 1
            _state["last"] = {"rooms": rooms, "sent": sent, "seconds": round(time.monotonic() - started, 3)}
            from app.observability import metrics  # here: settings import this module in gunicorn's master

            metrics.resync_run(sent)
            log.log(logging.INFO if sent else logging.DEBUG, "resync: %d room(s), %d missed frame(s) sent", rooms, sent)
        if not _state["again"]:
            return


async def resync_all() -> tuple[int, int]:
    from django.conf import settings

    from app.chat.consumers import messages_after

    rooms = sent = 0
    for room_id, members in list(_rooms.items()):
        # Only sockets whose watermark is known *before* the read: each is at
        # or above the floor, so the rows cover everything it may miss.
        live = [c for c in members if getattr(c, "delivered", None) is not None]
        if not live:
            continue
        floor = min(c.delivered.upto for c in live)
        rows = await messages_after(room_id, floor, settings.CHAT_RESYNC_LIMIT)
        rooms += 1
        for consumer in live:
            sent += await consumer.catch_up(rows)
    return rooms, sent


async def prune_subscriptions(layer=None) -> int:
    """Unsubscribe channels and groups that no consumer in this process uses.

    The one place that reads channels_redis' private PubSub state (the
    per-loop layer's shards, their lock and subscriptions): the library has no
    API for it. tests/integration/test_prune_subscriptions.py pins what it
    relies on, with a real Redis: a group discarded while Redis is down stays
    subscribed after the reconnect (redis-py re-subscribes it), and this drops it."""
    if layer is None:
        from channels.layers import get_channel_layer

        layer = get_channel_layer()
    get_layer = getattr(layer, "_get_layer", None)
    if get_layer is None:
        return 0
    loop_layer = get_layer()
    shards = getattr(loop_layer, "_shards", None)
    if shards is None:
        return 0
    wanted = set(loop_layer.channels) | set(loop_layer.groups)
    if getattr(loop_layer, "inbox", None):
        wanted.add(loop_layer.inbox)  # the worker's sockets' channels, all in one (app/chat/layer.py)
    dropped = 0
    for shard in shards:
        pubsub = getattr(shard, "_pubsub", None)
        async with shard._lock:
            stale = {name for name in shard._subscribed_to if name not in wanted}
            if pubsub is not None:
                stale |= {
                    (n.decode() if isinstance(n, bytes) else n)
                    for n in list(pubsub.channels)
                } - wanted
            if stale and pubsub is not None:
                await pubsub.unsubscribe(*stale)
            shard._subscribed_to -= stale
            dropped += len(stale)
    if dropped:
        log.info("dropped %d stale subscription(s)", dropped)
    return dropped
