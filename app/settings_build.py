"""Throwaway settings for build steps (collectstatic) that have no secrets.

Only placeholders are set, and only when the variable is absent, so a build
never needs a real SECRET_KEY, database or Redis, and nothing secret can end
up in an image layer. Never used to serve requests.
"""
import os

for _name, _value in {
    "DEBUG": "False",
    "SECRET_KEY": "build-only-placeholder-not-a-secret-" + "x" * 32,
    "ALLOWED_HOSTS": "build.invalid",
    # Never connected to (collectstatic needs no database; SQLite is refused with DEBUG off).
    "DATABASE_URL": "postgres://build.invalid:5432/none",
    "REDIS_URL": "redis://build.invalid:6379/0",
}.items():
    os.environ.setdefault(_name, _value)

from app.settings import *  # noqa: E402,F401,F403
