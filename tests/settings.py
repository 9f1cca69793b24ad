"""Settings for in-process tests: the production settings, DEBUG off, with
SQLite, the in-memory channel layer, an in-process cache and in-process rate
limit buckets so unit tests need no services. (Production refuses SQLite: the
settings are read with a PostgreSQL URL that is never connected to, then the
database is swapped. Integration tests run the real stack in subprocesses with
app.settings.)"""
import os

os.environ.update(
    DEBUG="False",
    SECRET_KEY="unit-tests-only-" + "k" * 48,
    ALLOWED_HOSTS="testserver,localhost,chat.example.com",
    SITE_DOMAIN="chat.example.com",
    DATABASE_URL="postgres://unit:tests@127.0.0.1:1/never-connected",
    REDIS_URL="redis://127.0.0.1:1/0",
)

from app.settings import *  # noqa: E402,F401,F403

DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
CHAT_LIMITS_REDIS_URL = None
STORAGES = {**STORAGES, "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"}}  # noqa: F405
SECURE_SSL_REDIRECT = False
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
# No collectstatic before unit tests: serve from the finders instead.
WHITENOISE_USE_FINDERS = True
WHITENOISE_AUTOREFRESH = True
