"""Settings for in-process tests: the production settings, DEBUG off, with
SQLite and the in-memory channel layer so unit tests need no services.
(Integration tests run the real stack in subprocesses with app.settings.)"""
import os

os.environ.update(
    DEBUG="False",
    SECRET_KEY="unit-tests-only-" + "k" * 48,
    ALLOWED_HOSTS="testserver,localhost,chat.example.com",
    SITE_DOMAIN="chat.example.com",
    DATABASE_URL="sqlite://:memory:",
    REDIS_URL="redis://127.0.0.1:1/0",
)

from app.settings import *  # noqa: E402,F401,F403

CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
STORAGES = {**STORAGES, "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"}}  # noqa: F405
SECURE_SSL_REDIRECT = False
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
# No collectstatic before unit tests: serve from the finders instead.
WHITENOISE_USE_FINDERS = True
WHITENOISE_AUTOREFRESH = True
