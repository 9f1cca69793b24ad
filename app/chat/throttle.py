"""Rate limits shared by every worker and host: handshakes, logins, sign-ups
per client address; rooms created per user (README "Settings").

Each limit is a GCRA token bucket ("N per period, bursts of N") kept in Redis
by one Lua script, timed by Redis' own clock, so every gunicorn worker and
every web host draws on the same budget. When Redis cannot be reached the
limit fails safe: `Unavailable` is raised and the caller refuses (a 503 page,
a form error, a websocket error frame), never "allow everything".

The client address is the one Uvicorn puts in the ASGI scope (REMOTE_ADDR for
Django), which honours X-Forwarded-For only from proxies gunicorn trusts
(`FORWARDED_ALLOW_IPS`); no header is read here. An IPv6 client is counted
by its /64, the block one subscriber gets.

Redis is one server (REDIS_URL) or the primary Redis Sentinel names
(REDIS_SENTINELS): app/redis_config.py builds the clients either way.
Without either (DEBUG only: `make run`) the buckets live in the process.
"""
from __future__ import annotations

import asyncio
import contextvars
import ipaddress
import logging
import math
import threading
import time
from dataclasses import dataclass

from django.conf import settings

from app.observability import metrics

log = logging.getLogger(__name__)

KEY_PREFIX = "chat:limit:"
TIMEOUT = 2.0  # seconds for one Redis round trip; longer counts as "Redis is down"
POOL_SIZE = 32  # Redis connections per worker for the handshake limit

# One call takes a token from each of several buckets, in order (the async
# path batches the hits that arrive while one call is in flight: `_Batch`).
# KEYS[i]: a bucket. ARGV[2i-1], ARGV[2i]: its milliseconds per token and its
# burst window in ms. Returns, per bucket, 0 when allowed, else the
# milliseconds until its next token.
GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[2 * i - 1])
  local window = tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat < now then tat = now end
  local new_tat = tat + interval
  if new_tat - now > window then
    out[i] = math.ceil(new_tat - window - now)
  else
    -- at least 1 ms: with a huge rate, interval is below a double's precision at
    -- epoch milliseconds, new_tat == now, and PX 0 is an error.
    redis.call('SET', key, new_tat, 'PX', math.max(1, math.ceil(new_tat - now)))
    out[i] = 0
  end
end
return out
"""


class Unavailable(Exception):
    """The shared store cannot be reached: refuse, do not guess."""


@dataclass(frozen=True)
class Limit:
    name: str
    count: int  # per period; also the burst
    period: float  # seconds

    @property
    def interval_ms(self) -> float:
        return self.period * 1000.0 / self.count

    @property
    def window_ms(self) -> float:
        return self.period * 1000.0


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    retry_after: int = 0  # whole seconds (at least 1 when refused)


def handshakes() -> Limit:
    return Limit("handshake", settings.CHAT_ADDRESS_HANDSHAKES_PER_MINUTE, 60)


def logins() -> Limit:
    return Limit("login", settings.CHAT_ADDRESS_LOGINS_PER_MINUTE, 60)


def signups() -> Limit:
    return Limit("signup", settings.CHAT_ADDRESS_SIGNUPS_PER_HOUR, 3600)


def rooms() -> Limit:
    return Limit("room", settings.CHAT_USER_ROOMS_PER_HOUR, 3600)


def user_messages() -> Limit:
    """CHAT_USER_RATE_PER_SECOND, bursts of CHAT_USER_RATE_BURST: one bucket per
    user over all of that user's sockets, on every worker and host."""
    rate, burst = settings.CHAT_USER_RATE_PER_SECOND, settings.CHAT_USER_RATE_BURST
    return Limit("user-message", burst, burst / rate)


def address_of(address: str | None) -> str:
    """The bucket name of a client address (from the scope / REMOTE_ADDR)."""
    if not address:
        return "unknown"
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:  # a unix socket path or similar: one bucket per name
        return address[:100]
    if ip.version == 6:
        if ip.ipv4_mapped:
            return str(ip.ipv4_mapped)
        return f"{ipaddress.ip_network((ip, 64), strict=False).network_address}/64"
    return str(ip)


def scope_address(scope) -> str:
    client = scope.get("client")
    return address_of(client[0] if client else None)


def request_address(request) -> str | None:
    """For django-axes (AXES_CLIENT_IP_CALLABLE) and the views: REMOTE_ADDR only."""
    return request.META.get("REMOTE_ADDR")


def _verdict(wait_ms: int, limit: Limit) -> Verdict:
    if wait_ms <= 0:
        return Verdict(True)
    metrics.rate_limited(limit.name)
    return Verdict(False, max(1, math.ceil(wait_ms / 1000)))


def _key(limit: Limit, identity) -> str:
    return f"{KEY_PREFIX}{limit.name}:{identity}"


def _store_errors() -> tuple[type[BaseException], ...]:
    from redis.exceptions import RedisError

    return (RedisError, OSError, asyncio.TimeoutError, TimeoutError)


# --- Redis -------------------------------------------------------------------

_clients: dict = {}
_clients_lock = threading.Lock()


def _target():
    """The Redis of the limits (app/redis_config.py), or None: in-process buckets.
    settings.CHAT_LIMITS_REDIS_URL (one Redis; tests point it elsewhere) or
    settings.CHAT_LIMITS_REDIS_SENTINEL (the primary the sentinels name)."""
    from app.redis_config import RedisTarget

    url = settings.CHAT_LIMITS_REDIS_URL
    if url:
        # Asked for on every Redis command of the limits: built once per set of settings.
        key = (url, getattr(settings, "REDIS", None) and settings.REDIS.password, settings.REDIS_TLS_INSECURE)
        target = _url_targets.get(key)
        if target is None:
            target = _url_targets[key] = RedisTarget(url=key[0], password=key[1], tls_insecure=key[2])
        return target
    return getattr(settings, "CHAT_LIMITS_REDIS_SENTINEL", None)


_url_targets: dict = {}


def _sync_script():
    target = _target()
    with _clients_lock:
        if ("sync", target) not in _clients:
            client = target.sync_client(socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT)
            _clients[("sync", target)] = client.register_script(GCRA)
        return _clients[("sync", target)]


def shared() -> bool:
    """Whether the limits live in Redis (else in-process buckets: DEBUG without Redis)."""
    return _target() is not None


def async_redis():
    """This event loop's client of the limits' Redis (also app/chat/slots.py's).
    redis-py's asyncio pool belongs to one event loop: one client per loop."""
    target, loop = _target(), asyncio.get_running_loop()
    key = ("async", target, id(loop))
    client = _clients.get(key)
    if client is None or client[0] is not loop:
        # redis-py's default asyncio pool refuses the 101st concurrent command
        # ("Too many connections"): a burst of handshakes would read as "Redis
        # down". A blocking pool makes them wait their turn (one EVALSHA is
        # well under a millisecond) and fails only after TIMEOUT.
        client = _clients[key] = (loop, target.async_client(max_connections=POOL_SIZE, timeout=TIMEOUT,
                                                           socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT))
    return client[1]


def async_script(source: str):
    """`source` registered on this event loop's client (EVALSHA, EVAL on a miss)."""
    client = async_redis()
    key = ("script", id(client), source)
    script = _clients.get(key)
    if script is None or script[0] is not client:
        script = _clients[key] = (client, client.register_script(source))
    return script[1]


# Hits one call carries at most (one EVALSHA, one round trip).
MAX_BATCH = 500


class _Batch:
    """This event loop's hits on the shared buckets, sent together.

    A hit that comes while no call is in flight goes at once; the hits that
    come while one is in flight go together in the next. Under load every
    received message asks the per-user budget, and through redis-py each
    EVALSHA of its own cost a pool checkout, a timeout, command packing and a
    read turn of the event loop: about as much of a worker's CPU as handing
    the message to all 20 members of its room (bench/README.md "The
    message path"). The script takes the tokens in the order the
    hits came, so two hits on one bucket in a batch count twice, as two calls did."""

    def __init__(self, script):
        self.script = script
        self.pending: list = []
        self.flusher: asyncio.Task | None = None

    async def hit(self, key: str, limit: Limit) -> int:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self.pending.append((key, limit, done))
        if self.flusher is None or self.flusher.done():
            # No context of the caller's: a consumer's context holds its thread-sensitive executor.
            self.flusher = loop.create_task(self._flush(), context=contextvars.Context())
        return await done

    async def _flush(self) -> None:
        while self.pending:
            batch, self.pending = self.pending[:MAX_BATCH], self.pending[MAX_BATCH:]
            args = []
            for _, limit, _ in batch:
                args += (limit.interval_ms, limit.window_ms)
            try:
                async with asyncio.timeout(TIMEOUT):
                    waits = await self.script(keys=[key for key, _, _ in batch], args=args)
            except BaseException as exc:  # every hit of the batch failed with it
                for _, _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
                if not isinstance(exc, Exception):  # cancelled: nobody waits forever
                    for _, _, done in self.pending:
                        done.cancel()
                    self.pending = []
                    raise
            else:
                for (_, _, done), wait in zip(batch, waits):
                    if not done.done():  # its caller gave up meanwhile
                        done.set_result(int(wait))


def _batch() -> _Batch:
    """This event loop's `_Batch` (one per async client, as the script)."""
    client = async_redis()
    key = ("batch", id(client))
    batch = _clients.get(key)
    if batch is None or batch[0] is not client:
        batch = _clients[key] = (client, _Batch(async_script(GCRA)))
    return batch[1]


# --- in-process (DEBUG without Redis) -------------------------------------------

_memory: dict[str, float] = {}
_memory_lock = threading.Lock()


def _memory_hit(key: str, limit: Limit) -> int:
    now = time.monotonic() * 1000.0
    with _memory_lock:
        tat = max(_memory.get(key, 0.0), now)
        new_tat = tat + limit.interval_ms
        if new_tat - now > limit.window_ms:
            return math.ceil(new_tat - limit.window_ms - now)
        _memory[key] = new_tat
        return 0


def _memory_prune() -> None:
    """Drop full buckets (their TAT is in the past): they hold nothing."""
    now = time.monotonic() * 1000.0
    with _memory_lock:
        for key in [k for k, tat in _memory.items() if tat < now]:
            del _memory[key]


def reset_local() -> None:
    """Empty the in-process buckets (tests)."""
    with _memory_lock:
        _memory.clear()
    _fallback.update(until=0.0, down=False)


# --- the API -------------------------------------------------------------------


def hit(limit: Limit, identity) -> Verdict:
    """Take one token from `identity`'s bucket (sync: views). Raises Unavailable."""
    key = _key(limit, identity)
    if _target() is None:
        return _verdict(_memory_hit(key, limit), limit)
    try:
        [wait] = _sync_script()(keys=[key], args=[limit.interval_ms, limit.window_ms])
    except _store_errors() as exc:
        raise Unavailable(f"{type(exc).__name__}: {exc}") from None
    return _verdict(int(wait), limit)


async def ahit(limit: Limit, identity) -> Verdict:
    """Take one token from `identity`'s bucket (async: the websocket guard). Raises Unavailable."""
    key = _key(limit, identity)
    if _target() is None:
        return _verdict(_memory_hit(key, limit), limit)
    try:
        # asyncio.timeout, not wait_for: on Python 3.11 (Debian 12, the image)
        # wait_for runs the call in a task of its own, one more turn of a busy
        # event loop for every message sent.
        async with asyncio.timeout(TIMEOUT):
            wait = await _batch().hit(key, limit)
    except _store_errors() as exc:
        raise Unavailable(f"{type(exc).__name__}: {exc}") from None
    return _verdict(int(wait), limit)


# How long a process counts alone after the shared store failed, before it
# tries Redis again (a dead Redis must not cost every message a timeout).
LOCAL_FALLBACK_SECONDS = 1.0
_fallback = {"until": 0.0, "down": False}


async def ahit_or_local(limit: Limit, identity) -> Verdict:
    """Like `ahit`, but while Redis cannot be reached this process keeps the
    bucket itself instead of refusing. For the per-user message budget
    (app/chat/consumers.py): a Redis restart must not silence every open
    socket (messages stored meanwhile reach everybody through the resync), and
    the budget still holds per process, so a user gets at most workers x hosts
    times it for the length of the outage, never "unlimited"."""
    key = _key(limit, identity)
    if not shared():
        return _verdict(_memory_hit(key, limit), limit)
    now = time.monotonic()
    if now >= _fallback["until"]:
        try:
            verdict = await ahit(limit, identity)
        except Unavailable as exc:
            if not _fallback["down"]:
                log.warning("rate-limit store unavailable (%s); counting %s per process meanwhile", exc, limit.name)
            _fallback.update(until=now + LOCAL_FALLBACK_SECONDS, down=True)
            if len(_memory) > 10000:
                _memory_prune()
        else:
            if _fallback["down"]:
                log.info("rate-limit store reachable again; %s shared again", limit.name)
                _fallback["down"] = False
            return verdict
    return _verdict(_memory_hit(key, limit), limit)
