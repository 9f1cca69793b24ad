"""Django settings: read from the environment only (README: "Settings").

DEBUG defaults to False, so a deploy that forgets it gets production
behaviour, never the dev-only Daphne app ("No module named 'daphne'").
With DEBUG off, SECRET_KEY, ALLOWED_HOSTS, DATABASE_URL and REDIS_URL (or
REDIS_SENTINELS) are required and a missing one stops start-up with a message naming it; so does
an unsafe one: a weak SECRET_KEY, `ALLOWED_HOSTS=*` without ALLOW_ANY_HOST=True,
a SQLite DATABASE_URL.
"""
from datetime import timedelta
from pathlib import Path

import dj_database_url

from app import env, redis_config
from app.observability.logs import FORMATTERS

BASE_DIR = Path(__file__).resolve().parent.parent

DEBUG = env.get_bool("DEBUG", False)
_PROD = "" if DEBUG else " when DEBUG is False"

SECRET_KEY = env.get_str(
    "SECRET_KEY",
    "dev-only-insecure-key-never-used-when-DEBUG-is-False-0123456789abcdef",
    required=not DEBUG,
    why=_PROD,
)
if not DEBUG and (_weak := env.secret_key_problem(SECRET_KEY)):
    raise env.ConfigError(
        f"SECRET_KEY is weak: {_weak}. Generate one: python3 -c 'import secrets; print(secrets.token_urlsafe(50))'"
    )
ALLOWED_HOSTS = env.get_list("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"] if DEBUG else [])
if not ALLOWED_HOSTS:
    raise env.ConfigError(
        "ALLOWED_HOSTS is required when DEBUG is False: a comma-separated list of the host names "
        "users reach the app by (e.g. chat.example.com)."
    )
# "*" answers any Host (a forged Host then reaches password-reset links and
# absolute URLs), so production needs an explicit yes for it. The websocket
# Origin check stays on either way (app/chat/origin.py).
ALLOW_ANY_HOST = env.get_bool("ALLOW_ANY_HOST", False)
if not DEBUG and "*" in ALLOWED_HOSTS and not ALLOW_ANY_HOST:
    raise env.ConfigError(
        "ALLOWED_HOSTS contains '*', which accepts any Host header: list the host names users reach "
        "(e.g. chat.example.com), or set ALLOW_ANY_HOST=True if your platform needs the wildcard."
    )

# The host users reach, used for absolute ws:// / wss:// URLs through the Sites
# framework; `migrate` writes it into the Site row so the domain is never a
# stale "example.com" (the "chat loads but nothing happens" trap).
_concrete_hosts = [h for h in ALLOWED_HOSTS if h != "*" and not h.startswith(".")]
SITE_DOMAIN = env.get_str("SITE_DOMAIN", None) or (
    ("localhost:8000" if DEBUG else _concrete_hosts[0]) if (DEBUG or _concrete_hosts) else None
)
if not SITE_DOMAIN:
    raise env.ConfigError(
        "SITE_DOMAIN is required when ALLOWED_HOSTS has only wildcard entries: "
        "set it to the host users reach (e.g. chat.example.com)."
    )
SITE_ID = 1
USE_HTTPS_IN_ABSOLUTE_URLS = env.get_bool("USE_HTTPS_IN_ABSOLUTE_URLS", not DEBUG)

INSTALLED_APPS = [
    # Daphne's runserver is a development convenience only: production runs
    # gunicorn with Uvicorn workers and its lock has no daphne.
    *(["daphne"] if DEBUG else []),
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.sites",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "channels",
    "axes",
    "app.chat",
]

MIDDLEWARE = [
    # First: /healthz, /readyz and /startupz answer whatever the Host header
    # says (platform checkers call the private address); every other path
    # still refuses a Host outside ALLOWED_HOSTS (app/probes.py).
    "app.probes.HealthCheckMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    # The signed-in user's id for this request's log lines (LOG_FORMAT=json).
    "app.observability.logs.UserMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Logins and sign-ups per client address (HTTP 429); Redis down: 503.
    "app.chat.throttle_http.ThrottleMiddleware",
    # Last, as django-axes requires: turns its lockout into our 429 page.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "app.urls"
ASGI_APPLICATION = "app.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "app" / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# Database ------------------------------------------------------------------
DATABASE_URL = env.get_str("DATABASE_URL", f"sqlite:///{BASE_DIR / 'db.sqlite3'}", required=not DEBUG, why=_PROD)
try:
    DATABASES = {"default": dj_database_url.parse(DATABASE_URL, conn_max_age=0)}
except Exception as exc:  # dj-database-url raises several types for bad URLs
    raise env.ConfigError(f"DATABASE_URL is not a valid database URL: {exc}") from None
if not DEBUG and DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # One file on one host: every other web host and every redeploy would see
    # another database (or none).
    raise env.ConfigError("DATABASE_URL points at SQLite, which is refused when DEBUG is False: use PostgreSQL "
                          "(postgres://user:pass@host:5432/db).")
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql" and env.get_bool("DATABASE_POOL", True):
    # A small per-process pool: the Uvicorn worker runs ORM calls on one
    # thread, so a few connections are enough and stay under small plans' limits.
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": 1,
        "max_size": env.get_int("DATABASE_POOL_MAX_SIZE", 4, minimum=1),
        # How long a request waits for a pooled connection before it fails
        # (503 page, websocket error frame): the wait while PostgreSQL is down.
        "timeout": env.get_float("DATABASE_POOL_TIMEOUT", 5.0, minimum=0.1),
    }
    # The pool checks a connection (an empty query) before it lends it out. A
    # connection that sat in the pool while PostgreSQL restarted is dead, and
    # without the check the first request or handshake to get it failed (a
    # 503, a 1013) after every restart. One round trip per hop to the ORM's
    # thread; the message writer has a connection of its own (app/chat/writer.py).
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Channel layer --------------------------------------------------------------
# One Redis (REDIS_URL) or the primary that Redis Sentinel names
# (REDIS_SENTINELS + REDIS_SENTINEL_MASTER); app/redis_config.py turns either
# into the arguments of the channel layer, the cache and the rate limits.
REDIS = redis_config.from_environment(required=not DEBUG, why=_PROD)
REDIS_URL = REDIS.url if REDIS else None
REDIS_TLS_INSECURE = REDIS.tls_insecure if REDIS else False
CHANNEL_LAYER = env.get_choice("CHANNEL_LAYER", "pubsub", ("pubsub", "core"))
if REDIS:
    _redis_host = REDIS.channel_layer_host(CHANNEL_LAYER)
    if env.get_bool("CHAT_RESYNC_ON_REDIS_RECONNECT", True):
        # After a Redis restart or a Sentinel failover each worker sends its
        # sockets what they missed from the database (app/chat/resync.py);
        # redis-py calls this on every connect.
        from app.chat.resync import on_redis_connect

        _redis_host["redis_connect_func"] = on_redis_connect
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": {
                "pubsub": "app.chat.layer.ChatPubSubChannelLayer",
                "core": "channels_redis.core.RedisChannelLayer",
            }[CHANNEL_LAYER],
            "CONFIG": {"hosts": [_redis_host]},
        }
    }
    if CHANNEL_LAYER == "core":
        # The core layer keeps each worker's pending messages in Redis and drops
        # new ones past `capacity` (default 100), and takes a pooled connection
        # per command: redis-py refuses the 101st concurrent one ("Too many
        # connections", the consumer dies). Both failed under load in the
        # benchmark (README "Performance").
        CHANNEL_LAYERS["default"]["CONFIG"]["capacity"] = env.get_int("CHANNEL_LAYER_CAPACITY", 1000, minimum=1)
        _redis_host["max_connections"] = env.get_int("CHANNEL_LAYER_MAX_CONNECTIONS", 1000, minimum=1)
else:
    # Only reachable with DEBUG on: one process, so one "room" for everybody.
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

# Cache: Redis, so what it counts (django-axes' failed logins) is shared by
# every worker and host; short timeouts so a dead Redis is an error, not a hang.
if REDIS:
    CACHES = {"default": REDIS.cache(key_prefix="chat", timeout=2)}
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
# The rate limits of app/chat/throttle.py: one Redis by URL, or the Sentinel
# target (None and None: in-process buckets, DEBUG only).
CHAT_LIMITS_REDIS_URL = REDIS_URL
CHAT_LIMITS_REDIS_SENTINEL = REDIS if REDIS and REDIS.is_sentinel else None

# Auth -----------------------------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
# django-axes counts failed logins per account in the Redis cache above
# (shared by every worker and host) and locks the account, whatever address
# the attempts come from; per-address login limits are app/chat/throttle.py's.
AUTHENTICATION_BACKENDS = ["axes.backends.AxesStandaloneBackend", "django.contrib.auth.backends.ModelBackend"]
AXES_HANDLER = "axes.handlers.cache.AxesCacheHandler"
AXES_CACHE = "default"
AXES_LOCKOUT_PARAMETERS = ["username"]
AXES_FAILURE_LIMIT = env.get_int("CHAT_ACCOUNT_LOGIN_FAILURES", 10, minimum=1)
AXES_COOLOFF_TIME = timedelta(minutes=env.get_float("CHAT_ACCOUNT_LOCKOUT_MINUTES", 15.0, minimum=0.1))
AXES_RESET_ON_SUCCESS = True
# Attempts during a lockout do not extend it: the owner gets back in after
# the cool-off even while a script keeps trying.
AXES_RESET_COOL_OFF_ON_FAILURE_DURING_LOCKOUT = False
AXES_CLIENT_IP_CALLABLE = "app.chat.throttle.request_address"  # REMOTE_ADDR, never a raw header
AXES_LOCKOUT_CALLABLE = "app.chat.throttle_http.locked_out"
AXES_VERBOSE = False  # no start-up banner in every manage.py command; failures are still logged
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "chat:rooms"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

# Static files: whitenoise serves them with far-future headers for hashed names.
STATIC_URL = "/static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"
        if DEBUG
        else "whitenoise.storage.CompressedManifestStaticFilesStorage"
    },
}

# Security: platforms terminate TLS and say so in X-Forwarded-Proto.
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_SSL_REDIRECT = env.get_bool("SECURE_SSL_REDIRECT", not DEBUG)
# Platform health checks speak plain HTTP to the container (they are answered
# before SecurityMiddleware anyway, by app.probes.HealthCheckMiddleware).
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^startupz$"]
SECURE_HSTS_SECONDS = env.get_int("SECURE_HSTS_SECONDS", 0 if DEBUG else 31536000, minimum=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.get_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", not DEBUG)
SECURE_HSTS_PRELOAD = env.get_bool("SECURE_HSTS_PRELOAD", not DEBUG)
SESSION_COOKIE_SECURE = not DEBUG
CSRF_COOKIE_SECURE = not DEBUG
CSRF_TRUSTED_ORIGINS = env.get_list("CSRF_TRUSTED_ORIGINS", [])
X_FRAME_OPTIONS = "DENY"

# Chat -------------------------------------------------------------------------
CHAT_MAX_MESSAGE_LENGTH = env.get_int("CHAT_MAX_MESSAGE_LENGTH", 2000, minimum=1)
CHAT_HISTORY = env.get_int("CHAT_HISTORY", 50, minimum=1)
CHAT_RATE_PER_SECOND = env.get_float("CHAT_RATE_PER_SECOND", 5.0, minimum=0.1)
CHAT_RATE_BURST = env.get_int("CHAT_RATE_BURST", 10, minimum=1)
# Limits shared by every worker and host (app/chat/throttle.py), far above what
# a person does: per client address, websocket handshakes, login and sign-up
# attempts; per user, rooms created.
CHAT_ADDRESS_HANDSHAKES_PER_MINUTE = env.get_int("CHAT_ADDRESS_HANDSHAKES_PER_MINUTE", 600, minimum=1)
CHAT_ADDRESS_LOGINS_PER_MINUTE = env.get_int("CHAT_ADDRESS_LOGINS_PER_MINUTE", 30, minimum=1)
CHAT_ADDRESS_SIGNUPS_PER_HOUR = env.get_int("CHAT_ADDRESS_SIGNUPS_PER_HOUR", 30, minimum=1)
CHAT_USER_ROOMS_PER_HOUR = env.get_int("CHAT_USER_ROOMS_PER_HOUR", 50, minimum=1)
# Per user, over all of that user's sockets on every worker and host (in Redis:
# app/chat/slots.py, app/chat/throttle.py): open sockets, and messages (a token
# bucket; each socket also keeps CHAT_RATE_PER_SECOND / CHAT_RATE_BURST).
CHAT_MAX_SOCKETS_PER_USER = env.get_int("CHAT_MAX_SOCKETS_PER_USER", 10, minimum=1)
CHAT_USER_RATE_PER_SECOND = env.get_float("CHAT_USER_RATE_PER_SECOND", 5.0, minimum=0.1)
CHAT_USER_RATE_BURST = env.get_int("CHAT_USER_RATE_BURST", 10, minimum=1)
# Seconds between the re-checks of every open socket's session, user and room
# in each worker: the backstop for revocations no signal announced (a session
# deleted from the database, raw SQL); signals close sockets at once
# (app/chat/revocation.py).
CHAT_SESSION_RECHECK_INTERVAL = env.get_float("CHAT_SESSION_RECHECK_INTERVAL", 30.0, minimum=0.5)
CHAT_ROOMS_PER_PAGE = env.get_int("CHAT_ROOMS_PER_PAGE", 50, minimum=1)
# At most this many stored messages per room are sent to a socket after a Redis reconnect.
CHAT_RESYNC_LIMIT = env.get_int("CHAT_RESYNC_LIMIT", 1000, minimum=1)
# Seconds between resync passes in each worker (0: only after a Redis reconnect);
# bounds how late a message stored by a worker killed before publishing it arrives.
CHAT_RESYNC_INTERVAL = env.get_float("CHAT_RESYNC_INTERVAL", 30.0, minimum=0.0)

SILENCED_SYSTEM_CHECKS = [
    # SECRET_KEY: replaced by the start-time refusal above (env.secret_key_problem),
    # which Render's generated key (44 characters) passes and W009 (50) would not.
    "security.W009",
    # django-axes wants "ip_address" among the lockout parameters; here the
    # account is locked whatever the address (a distributed guesser), and
    # addresses are limited by CHAT_ADDRESS_LOGINS_PER_MINUTE instead.
    "axes.W006",
    # DEBUG without Redis: one process, so an in-process cache is shared enough.
    *(["axes.W001"] if not REDIS else []),
]

# Observability (app/observability/, README "Observability") -------------------
# /metrics on the app port only for `Authorization: Bearer <METRICS_TOKEN>`;
# unset: no metrics there (a 404 like any unknown path).
METRICS_TOKEN = env.get_str("METRICS_TOKEN", None)
if METRICS_TOKEN and (_weak := env.metrics_token_problem(METRICS_TOKEN)):
    raise env.ConfigError(
        f"METRICS_TOKEN is unusable: {_weak}. Generate one: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
    )
# /metrics without a token on this second port (gunicorn.conf.py binds it on
# METRICS_ADDRESS); 0: none.
METRICS_PORT = env.get_int("METRICS_PORT", 0, minimum=1)
if METRICS_PORT > 65535:
    raise env.ConfigError(f"METRICS_PORT must be a TCP port (1-65535), got {METRICS_PORT}")
if METRICS_PORT and METRICS_PORT == env.get_int("PORT", 8000, minimum=1):
    raise env.ConfigError(f"METRICS_PORT must differ from PORT ({METRICS_PORT}): the app port never serves metrics "
                          "without a token")
LOG_FORMAT = env.get_choice("LOG_FORMAT", "plain", ("plain", "json"))
LOG_LEVEL = env.get_choice("LOG_LEVEL", "info", ("debug", "info", "warning", "error")).upper()

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"default": FORMATTERS[LOG_FORMAT]},
    "handlers": {"stdout": {"class": "logging.StreamHandler", "stream": "ext://sys.stdout", "formatter": "default"}},
    "root": {"handlers": ["stdout"], "level": LOG_LEVEL},
}
