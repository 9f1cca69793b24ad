"""Concurrent sockets per user (CHAT_MAX_SOCKETS_PER_USER), on every worker and host.

The count lives in Redis (the limits' Redis, app/chat/throttle.py):

* per user, a hash `chat:sockets:<user id>`: socket id -> id of the worker
  process holding it. A socket takes a slot at the handshake (one Lua script:
  count the live entries, refuse at the limit, else add) and gives it back
  when it closes;
* per worker process, a lease `chat:worker:<worker id>`, renewed every RENEW
  seconds by the worker and gone LEASE seconds after its last renewal.

An entry whose worker has no lease any more is not counted, and the next
handshake of that user deletes it: a worker killed with SIGKILL (or OOM, or a
host that lost power) frees its users' slots LEASE seconds later without
anyone cleaning up. A worker that was alive but lost its lease (Redis
restarted, or its event loop stalled for LEASE seconds) writes its sockets
back at the next renewal, so a Redis restart does not reset the count.

No Redis round trip per message or per delivered frame: one at the
handshake, one at the close, one per worker every RENEW seconds.

If Redis cannot be reached at the handshake, `acquire` raises
throttle.Unavailable and the socket is refused (error frame, close 1013);
a release that fails is retried by the renewal loop.

The script reads lease keys it computes itself (not passed in KEYS): fine on
one Redis or a Sentinel-managed primary, not on Redis Cluster.

Without a Redis URL (DEBUG only: `make run`, unit tests) the count is per process.
"""
from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import uuid

from app.chat import throttle

log = logging.getLogger(__name__)

USER_PREFIX = "chat:sockets:"
LEASE_PREFIX = "chat:worker:"
LEASE = 10.0  # seconds a dead worker's sockets keep their slots
RENEW = 3.0  # seconds between renewals of a live worker's lease
HASH_TTL = 3600.0  # a user hash nobody writes to expires (its entries are rewritten every REASSERT)
REASSERT = 600.0

# KEYS[1]: the user's hash. ARGV: limit, socket id, worker id, lease prefix,
# lease ms, hash ttl ms. Returns {1, sockets now} or {0, sockets held}.
ACQUIRE = """
local limit = tonumber(ARGV[1])
redis.call('SET', ARGV[4] .. ARGV[3], '1', 'PX', ARGV[5])
local entries = redis.call('HGETALL', KEYS[1])
local live, alive = 0, {}
for i = 1, #entries, 2 do
  local owner = entries[i + 1]
  if alive[owner] == nil then
    alive[owner] = redis.call('EXISTS', ARGV[4] .. owner) == 1
  end
  if alive[owner] then
    live = live + 1
  else
    redis.call('HDEL', KEYS[1], entries[i])
  end
end
if live >= limit then
  return {0, live}
end
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[6])
return {1, live + 1}
"""


class _Worker:
    """This process's sockets (one event loop per Uvicorn worker)."""

    def __init__(self, loop):
        self.loop = loop
        self.id = uuid.uuid4().hex
        self.held: dict[str, int] = {}  # socket id -> user id
        self.unreleased: dict[str, int] = {}  # releases that failed: retried by the renewal
        self.task: asyncio.Task | None = None
        self.reasserted = time.monotonic()
        self.store_down = False


_worker: _Worker | None = None
_local: dict[int, set[str]] = {}  # no Redis: user id -> socket ids


def _current() -> _Worker:
    global _worker
    loop = asyncio.get_running_loop()
    if _worker is None or _worker.loop is not loop:
        _worker = _Worker(loop)
    return _worker


def _user_key(user_id) -> str:
    return f"{USER_PREFIX}{user_id}"


def _shared() -> bool:
    return throttle.shared()


async def acquire(user_id: int, socket_id: str, limit: int) -> tuple[bool, int]:
    """Take a slot for `socket_id`. Returns (allowed, sockets the user holds);
    raises throttle.Unavailable if the count cannot be read."""
    if not _shared():
        held = _local.setdefault(user_id, set())
        if len(held) >= limit:
            return False, len(held)
        held.add(socket_id)
        return True, len(held)
    worker = _current()
    try:
        # asyncio.timeout, not wait_for: on Python 3.11 (the image) wait_for
        # runs the call in a task of its own, one more loop turn per handshake.
        async with asyncio.timeout(throttle.TIMEOUT):
            allowed, count = await throttle.async_script(ACQUIRE)(
                keys=[_user_key(user_id)],
                args=[limit, socket_id, worker.id, LEASE_PREFIX, int(LEASE * 1000), int(HASH_TTL * 1000)])
    except throttle._store_errors() as exc:
        raise throttle.Unavailable(f"{type(exc).__name__}: {exc}") from None
    if allowed:
        worker.held[socket_id] = user_id
        _ensure_renewal(worker)
    return bool(allowed), int(count)


async def release(user_id: int, socket_id: str) -> None:
    """Give the slot back (never raises: a failed release is retried)."""
    if not _shared():
        held = _local.get(user_id)
        if held is not None:
            held.discard(socket_id)
            if not held:
                del _local[user_id]
        return
    worker = _current()
    if worker.held.pop(socket_id, None) is None:
        return
    try:
        async with asyncio.timeout(throttle.TIMEOUT):
            await throttle.async_redis().hdel(_user_key(user_id), socket_id)
    except throttle._store_errors() as exc:
        log.warning("socket slot not released yet (%s); retrying", type(exc).__name__)
        worker.unreleased[socket_id] = user_id
        _ensure_renewal(worker)


def held_here() -> int:
    """Slots this process holds (tests, diagnostics)."""
    if not _shared():
        return sum(len(s) for s in _local.values())
    return len(_worker.held) if _worker is not None else 0


def _ensure_renewal(worker: _Worker) -> None:
    if worker.task is None or worker.task.done():
        # A context of its own: not the one of the consumer that started it.
        worker.task = worker.loop.create_task(_renew(worker), context=contextvars.Context())


async def _renew(worker: _Worker) -> None:
    while worker.held or worker.unreleased:
        await asyncio.sleep(RENEW)
        try:
            await asyncio.wait_for(renew_once(worker), throttle.TIMEOUT * 2)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # Redis away: the next round tries again
            if not worker.store_down:
                log.warning("socket lease not renewed (%s: %s)", type(exc).__name__, exc)
            worker.store_down = True
        else:
            if worker.store_down:
                log.info("socket lease renewed again")
            worker.store_down = False


async def renew_once(worker: _Worker | None = None) -> None:
    """Renew this worker's lease; write its sockets back if the lease had
    lapsed (or every REASSERT seconds, which keeps the user hashes from
    expiring); retry failed releases."""
    worker = worker or _current()
    client = throttle.async_redis()
    lease = LEASE_PREFIX + worker.id
    async with client.pipeline(transaction=True) as pipe:
        pipe.set(lease, "1", px=int(LEASE * 1000), nx=True)
        pipe.pexpire(lease, int(LEASE * 1000))
        lapsed, _ = await pipe.execute()
    now = time.monotonic()
    if lapsed or now - worker.reasserted >= REASSERT:
        if lapsed and worker.held:
            log.warning("socket lease had lapsed; writing back %d socket slot(s)", len(worker.held))
        async with client.pipeline(transaction=False) as pipe:
            for socket_id, user_id in list(worker.held.items()):
                pipe.hset(_user_key(user_id), socket_id, worker.id)
                pipe.pexpire(_user_key(user_id), int(HASH_TTL * 1000))
            await pipe.execute()
        worker.reasserted = now
    if worker.unreleased:
        pending = dict(worker.unreleased)
        async with client.pipeline(transaction=False) as pipe:
            for socket_id, user_id in pending.items():
                pipe.hdel(_user_key(user_id), socket_id)
            await pipe.execute()
        for socket_id in pending:
            worker.unreleased.pop(socket_id, None)
