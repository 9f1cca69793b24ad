"""Django settings: read from the environment only (README: "Settings").

DEBUG defaults to False, so a deploy that forgets it gets production
behaviour, never the dev-only Daphne app ("No module named 'daphne'").
With DEBUG off, SECRET_KEY, ALLOWED_HOSTS, DATABASE_URL and REDIS_URL are
required and a missing one stops start-up with a message naming it.
"""
from pathlib import Path

import dj_database_url

from app import env

BASE_DIR = Path(__file__).resolve().parent.parent

DEBUG = env.get_bool("DEBUG", False)
_PROD = "" if DEBUG else " when DEBUG is False"

SECRET_KEY = env.get_str(
    "SECRET_KEY",
    "dev-only-insecure-key-never-used-when-DEBUG-is-False-0123456789abcdef",
    required=not DEBUG,
    why=_PROD,
)
ALLOWED_HOSTS = env.get_list("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"] if DEBUG else [])
if not ALLOWED_HOSTS:
    raise env.ConfigError(
        "ALLOWED_HOSTS is required when DEBUG is False: a comma-separated list of the host names "
        "users reach the app by (e.g. chat.example.com)."
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
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
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
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Channel layer --------------------------------------------------------------
REDIS_URL = env.get_str("REDIS_URL", None, required=not DEBUG, why=_PROD + " (the channel layer needs Redis)")
CHANNEL_LAYER = env.get_choice("CHANNEL_LAYER", "pubsub", ("pubsub", "core"))
if REDIS_URL:
    if not REDIS_URL.startswith(("redis://", "rediss://", "unix://")):
        raise env.ConfigError(f"REDIS_URL must start with redis://, rediss:// or unix://, got {REDIS_URL.split(':')[0]!r}")
    _redis_host = {"address": REDIS_URL}
    if REDIS_URL.startswith("rediss://") and env.get_bool("REDIS_TLS_INSECURE", False):
        # Heroku's Key-Value Store presents a self-signed certificate.
        _redis_host["ssl_cert_reqs"] = "none"
    if env.get_bool("CHAT_RESYNC_ON_REDIS_RECONNECT", True):
        # After a Redis restart each worker sends its sockets what they missed
        # from the database (app/chat/resync.py); redis-py calls this on every connect.
        from app.chat.resync import on_redis_connect

        _redis_host["redis_connect_func"] = on_redis_connect
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": {
                "pubsub": "channels_redis.pubsub.RedisPubSubChannelLayer",
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

# Auth -----------------------------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
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
# At most this many stored messages per room are sent to a socket after a Redis reconnect.
CHAT_RESYNC_LIMIT = env.get_int("CHAT_RESYNC_LIMIT", 1000, minimum=1)
# Seconds between resync passes in each worker (0: only after a Redis reconnect);
# bounds how late a message stored by a worker killed before publishing it arrives.
CHAT_RESYNC_INTERVAL = env.get_float("CHAT_RESYNC_INTERVAL", 30.0, minimum=0.0)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"stdout": {"class": "logging.StreamHandler", "stream": "ext://sys.stdout", "formatter": "plain"}},
    "root": {"handlers": ["stdout"], "level": env.get_choice("LOG_LEVEL", "info", ("debug", "info", "warning", "error")).upper()},
}
