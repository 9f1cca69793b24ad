"""Where Redis is: one URL (`REDIS_URL`) or a set of Sentinels (`REDIS_SENTINELS`).

Three parts of the app talk to Redis and all three must follow a failover:
the channel layer (channels_redis), Django's cache (django-axes' failed-login
counts) and the rate limits (app/chat/throttle.py). `RedisTarget` is read
once from the environment by app/settings.py and gives each of them its
connection arguments, so a Sentinel deployment is configured in one place:

* `channel_layer_host()`: the host dict of channels_redis' CONFIG["hosts"].
  channels_redis (both layers) builds `redis.asyncio.sentinel.SentinelConnectionPool`
  when the dict has `sentinels` and `master_name` (channels_redis.utils.create_pool);
  the other keys go to every connection to the primary.
* `cache()`: Django's RedisCache has no Sentinel mode, but it builds its pool
  with `OPTIONS["pool_class"].from_url(LOCATION, **OPTIONS)` (documented:
  "pool_class"); `SentinelCachePool.from_url` returns a Sentinel-managed pool.
* `sync_client()` / `async_client()`: redis-py clients for the rate limits,
  the async one with a blocking pool (a burst of handshakes waits for a
  connection instead of failing with "Too many connections").

A Sentinel-managed connection asks the sentinels for the current primary
each time it connects, and one that finds its server demoted (READONLY)
disconnects and asks again; so after a failover every pool reconnects to
the new primary by itself, and the channel layer's `redis_connect_func`
(app/chat/resync.py) sees the reconnect as it sees a Redis restart.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

# Seconds: a sentinel or primary that does not answer in time counts as down
# and the next sentinel is asked (a host that vanished sends no RST).
SENTINEL_TIMEOUT = 2.0
CONNECT_TIMEOUT = 2.0
# Seconds a command to a Redis server may wait for its answer in Sentinel mode.
# A primary that froze (a stopped process, a hung host) keeps its connections
# open: without a limit a publish to it waits forever, and the consumer that
# sent it with it; after the timeout the connection is dropped and the next
# one asks the sentinels. The core layer's blocking pop waits up to 5 s
# (channels_redis' brpop_timeout), so its limit is above that.
SERVER_TIMEOUT = {"pubsub": 3.0, "core": 10.0}
# How often a subscribing connection asks the sentinels which server is the
# primary (FollowPrimaryConnection), and how long it waits for their answer.
ASK_PRIMARY_EVERY = 2.0
ASK_PRIMARY_TIMEOUT = 1.0


def url_password(url: str) -> str | None:
    """The password embedded in a redis:// URL, if any (redis-py's reading of it)."""
    try:
        password = urlsplit(url).password
    except ValueError:
        return None
    return unquote(password) if password else None


@dataclass(frozen=True)
class RedisTarget:
    """One Redis service: `url` XOR (`sentinels` + `master`)."""

    url: str | None = None
    sentinels: tuple[tuple[str, int], ...] = ()
    master: str | None = None
    password: str | None = field(default=None, repr=False)  # of the Redis servers (primary and replicas)
    sentinel_password: str | None = field(default=None, repr=False)  # of the sentinels (their requirepass)
    tls: bool = False  # Sentinel mode: TLS to sentinels and servers (URL mode: rediss://)
    tls_insecure: bool = False  # no certificate check (Heroku's self-signed certificate)
    tls_ca_file: str | None = None
    db: int = 0

    @property
    def is_sentinel(self) -> bool:
        return bool(self.sentinels)

    @property
    def uses_tls(self) -> bool:
        return self.tls if self.is_sentinel else bool(self.url and self.url.startswith("rediss://"))

    def describe(self) -> str:
        """For logs and errors: no password."""
        if self.is_sentinel:
            hosts = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.sentinels)
            return f"sentinel://{hosts}/{self.master}"
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}{parts.path}"

    # --- the arguments -----------------------------------------------------------
    def _tls_options(self) -> dict:
        options = {}
        if self.uses_tls:
            if self.is_sentinel:
                options["ssl"] = True
            if self.tls_insecure:
                options["ssl_cert_reqs"] = "none"
            if self.tls_ca_file:
                options["ssl_ca_certs"] = self.tls_ca_file
        return options

    def server_options(self) -> dict:
        """Arguments of every connection to a Redis server (not a sentinel)."""
        options = self._tls_options()
        if self.password and not (self.url and url_password(self.url)):
            options["password"] = self.password
        if self.is_sentinel:
            options["db"] = self.db
            # The primary is found anew on every connect; a dead host must not
            # hold a connect for the OS's two minutes.
            options["socket_connect_timeout"] = CONNECT_TIMEOUT
        return options

    def sentinel_options(self) -> dict:
        """Arguments of the connections to the sentinels themselves."""
        options = {"socket_timeout": SENTINEL_TIMEOUT, "socket_connect_timeout": SENTINEL_TIMEOUT,
                   **self._tls_options()}
        if self.sentinel_password:
            options["password"] = self.sentinel_password
        return options

    def channel_layer_host(self, layer: str = "pubsub", **extra) -> dict:
        """One entry of channels_redis' CONFIG["hosts"] for `layer` ("pubsub" or "core")."""
        if self.is_sentinel:
            host = {"sentinels": [list(s) for s in self.sentinels], "master_name": self.master,
                    "sentinel_kwargs": self.sentinel_options(), "socket_timeout": SERVER_TIMEOUT[layer],
                    "connection_class": FollowPrimarySSLConnection if self.uses_tls else FollowPrimaryConnection}
        else:
            host = {"address": self.url}
        return {**host, **self.server_options(), **extra}

    def cache(self, *, key_prefix: str, timeout: float) -> dict:
        """Django's CACHES["default"] (RedisCache) on this Redis."""
        options = {"socket_timeout": timeout, "socket_connect_timeout": timeout, **self.server_options()}
        location = self.url
        if self.is_sentinel:
            location = self.describe()  # read by nobody: the pool below finds the primary
            options.update(pool_class="app.redis_config.SentinelCachePool", sentinels=self.sentinels,
                           master_name=self.master, sentinel_kwargs=self.sentinel_options())
        return {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": location,
                "KEY_PREFIX": key_prefix, "OPTIONS": options}

    def sync_client(self, **options):
        import redis
        from redis.sentinel import Sentinel

        options = {**self.server_options(), **options}
        if self.is_sentinel:
            return Sentinel(list(self.sentinels), sentinel_kwargs=self.sentinel_options()).master_for(
                self.master, **options)
        return redis.Redis.from_url(self.url, **options)

    def async_client(self, *, max_connections: int, timeout: float, **options):
        """A redis.asyncio client whose pool waits up to `timeout` for a free
        connection (of `max_connections`) instead of refusing the next command."""
        import redis.asyncio
        from redis.asyncio.sentinel import Sentinel

        options = {**self.server_options(), **options}
        if self.is_sentinel:
            sentinel = Sentinel(list(self.sentinels), sentinel_kwargs=self.sentinel_options())
            pool = SentinelBlockingPool(self.master, sentinel, max_connections=max_connections, timeout=timeout,
                                        **options)
        else:
            pool = redis.asyncio.BlockingConnectionPool.from_url(self.url, max_connections=max_connections,
                                                                 timeout=timeout, **options)
        return redis.asyncio.Redis(connection_pool=pool)


def _sentinel_blocking_pool():
    from redis.asyncio import BlockingConnectionPool
    from redis.asyncio.sentinel import SentinelConnectionPool

    class SentinelBlockingPool(SentinelConnectionPool, BlockingConnectionPool):
        """redis-py's Sentinel pool (finds the primary) with the blocking pool's
        get_connection (waits for a free connection). Both are cooperative
        ConnectionPool subclasses; tests/unit/test_redis_sentinel.py pins it."""

    return SentinelBlockingPool


SentinelBlockingPool = _sentinel_blocking_pool()


def _follow_primary_connections():
    from redis.asyncio.connection import SSLConnection
    from redis.asyncio.sentinel import SentinelManagedConnection
    from redis.exceptions import ConnectionError

    class FollowPrimaryConnection(SentinelManagedConnection):
        _chat_asked = 0.0

        """A Sentinel-managed connection that leaves a primary the pool no
        longer names. The channel layer's PubSub connection only reads (with a
        short timeout), so a primary that froze instead of closing its sockets
        would keep it forever: nothing arrives and nothing fails. Every other
        connection of the pool that reconnects asks the sentinels and records
        the new primary in the pool (`master_address`), and this connection
        asks them itself at most every ASK_PRIMARY_EVERY seconds (a layer that
        only subscribes has no other connection that would); before each read
        it compares and, if its server is not that one any more,
        disconnects and raises ConnectionError, and redis-py's PubSub
        reconnects (to the new primary) and subscribes again, which
        app/chat/resync.py sees as a reconnect. Pinned by
        tests/faults/test_sentinel_failover.py::test_frozen_primary_neither_hangs_nor_loses_messages."""

        async def read_response(self, *args, **kwargs):
            pool = self.connection_pool
            primary = pool.master_address if pool.is_master else None
            if primary is not None and self.is_connected:
                # Nothing else may reconnect (a layer that only subscribes):
                # ask the sentinels ourselves, at most every ASK_PRIMARY_EVERY.
                now = time.monotonic()
                if now - self._chat_asked >= ASK_PRIMARY_EVERY:
                    self._chat_asked = now
                    try:
                        primary = await asyncio.wait_for(pool.get_master_address(), ASK_PRIMARY_TIMEOUT)
                    except Exception:  # no sentinel answers: keep what the pool knows
                        primary = pool.master_address or primary
            if primary is not None and self.is_connected and (self.host, self.port) != tuple(primary):
                await self.disconnect()
                raise ConnectionError(f"the primary moved to {primary[0]}:{primary[1]}")
            return await super().read_response(*args, **kwargs)

    class FollowPrimarySSLConnection(FollowPrimaryConnection, SSLConnection):
        pass

    return FollowPrimaryConnection, FollowPrimarySSLConnection


FollowPrimaryConnection, FollowPrimarySSLConnection = _follow_primary_connections()


class SentinelCachePool:
    """`pool_class` for Django's RedisCache: Django calls
    `pool_class.from_url(LOCATION, **OPTIONS)`; this returns redis-py's
    Sentinel-managed pool for the primary named in OPTIONS instead."""

    @classmethod
    def from_url(cls, url, *, sentinels, master_name, sentinel_kwargs=None, **options):
        from redis.sentinel import Sentinel, SentinelConnectionPool

        sentinel = Sentinel([tuple(s) for s in sentinels], sentinel_kwargs=sentinel_kwargs or {})
        return SentinelConnectionPool(master_name, sentinel, **options)


# --- reading the environment --------------------------------------------------------


def parse_host_ports(name: str, value: str) -> tuple[tuple[str, int], ...]:
    """"h1:26379,h2:26379,[::1]:26379" -> ((host, port), ...); ConfigError names `name`."""
    from app.env import ConfigError

    out = []
    for item in (i.strip() for i in value.split(",")):
        if not item:
            continue
        if "://" in item or "@" in item or "/" in item:
            raise ConfigError(f"{name} must be a comma list of host:port (no scheme, no password), got {item!r}")
        host, sep, port = item.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not sep or not host or ":" in host and not item.startswith("["):
            raise ConfigError(f"{name} must be a comma list of host:port (IPv6 as [addr]:port), got {item!r}")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"{name} has an entry without a valid port (1-65535): {item!r}")
        out.append((host, int(port)))
    if not out:
        raise ConfigError(f"{name} is empty: give at least one sentinel as host:port")
    if len(set(out)) != len(out):
        raise ConfigError(f"{name} lists a sentinel twice: {value!r}")
    return tuple(out)


def from_environment(*, required: bool, why: str = "") -> RedisTarget | None:
    """The Redis of this deployment, or None (DEBUG without Redis); ConfigError
    (one line naming the variables) for a missing, contradictory or bad value."""
    from app import env

    url = env.get_str("REDIS_URL", None)
    sentinels = env.get_str("REDIS_SENTINELS", None)
    master = env.get_str("REDIS_SENTINEL_MASTER", None)
    password = env.get_str("REDIS_PASSWORD", None)
    sentinel_password = env.get_str("REDIS_SENTINEL_PASSWORD", None)
    tls = env.get_bool("REDIS_TLS", False)
    tls_insecure = env.get_bool("REDIS_TLS_INSECURE", False)
    ca_file = env.get_str("REDIS_TLS_CA_FILE", None)

    if url and sentinels:
        raise env.ConfigError("REDIS_URL and REDIS_SENTINELS are both set: use one (REDIS_URL for one Redis, "
                              "REDIS_SENTINELS with REDIS_SENTINEL_MASTER for Sentinel failover)")
    if not url and not sentinels:
        for name, value in (("REDIS_SENTINEL_MASTER", master), ("REDIS_SENTINEL_PASSWORD", sentinel_password)):
            if value:
                raise env.ConfigError(f"{name} is set but REDIS_SENTINELS is not: list the sentinels (host:port,...)")
        if required:
            raise env.ConfigError(f"REDIS_URL is required{why} (the channel layer needs Redis; or set "
                                  "REDIS_SENTINELS and REDIS_SENTINEL_MASTER). Set it in the environment "
                                  "(see README: Settings).")
        return None
    if ca_file is not None:
        import os

        if not os.path.isfile(ca_file):
            raise env.ConfigError(f"REDIS_TLS_CA_FILE is not a readable file: {ca_file!r}")

    if url:
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise env.ConfigError(f"REDIS_URL must start with redis://, rediss:// or unix://, got {url.split(':')[0]!r}")
        for name, value in (("REDIS_SENTINEL_MASTER", master), ("REDIS_SENTINEL_PASSWORD", sentinel_password)):
            if value:
                raise env.ConfigError(f"{name} is set with REDIS_URL: it applies only with REDIS_SENTINELS")
        if tls:
            raise env.ConfigError("REDIS_TLS is set with REDIS_URL: use a rediss:// URL for TLS instead")
        embedded = url_password(url)
        if password and embedded and embedded != password:
            raise env.ConfigError("REDIS_PASSWORD and the password in REDIS_URL differ: set one of them")
        return RedisTarget(url=url, password=password, tls_insecure=tls_insecure, tls_ca_file=ca_file)

    if not master:
        raise env.ConfigError("REDIS_SENTINEL_MASTER is required with REDIS_SENTINELS: the name of the primary "
                              "the sentinels monitor (`sentinel monitor NAME ...`)")
    if any(c.isspace() for c in master):
        raise env.ConfigError(f"REDIS_SENTINEL_MASTER must be one word, got {master!r}")
    return RedisTarget(
        sentinels=parse_host_ports("REDIS_SENTINELS", sentinels), master=master, password=password,
        sentinel_password=sentinel_password, tls=tls, tls_insecure=tls_insecure, tls_ca_file=ca_file,
        db=env.get_int("REDIS_SENTINEL_DB", 0, minimum=0),
    )
