"""Typed access to the environment, with errors that name the variable.

Settings are read from the environment only (see the README's table). Every
parser raises `ConfigError` with the variable's name, so a bad deploy stops at
start with one readable line instead of failing later in a request.
"""
from __future__ import annotations

import os

from django.core.exceptions import ImproperlyConfigured

TRUE = {"1", "true", "yes", "on"}
FALSE = {"0", "false", "no", "off", ""}


class ConfigError(ImproperlyConfigured):
    pass


def raw(name: str) -> str | None:
    value = os.environ.get(name)
    return None if value is None else value.strip()


def get_bool(name: str, default: bool) -> bool:
    value = raw(name)
    if value is None:
        return default
    if value.lower() in TRUE:
        return True
    if value.lower() in FALSE:
        return False
    raise ConfigError(f"{name} must be True or False, got {value!r}")


def get_int(name: str, default: int, minimum: int | None = None) -> int:
    value = raw(name)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {value!r}") from None
    if minimum is not None and number < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {number}")
    return number


def get_float(name: str, default: float, minimum: float = 0.0) -> float:
    value = raw(name)
    if value is None or value == "":
        return default
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if number < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {number}")
    return number


def get_list(name: str, default: list[str]) -> list[str]:
    value = raw(name)
    if value is None:
        return list(default)
    return [item.strip() for item in value.split(",") if item.strip()]


def get_str(name: str, default: str | None, *, required: bool = False, why: str = "") -> str | None:
    value = raw(name)
    if value:
        return value
    if required:
        raise ConfigError(f"{name} is required{why}. Set it in the environment (see README: Settings).")
    return default


def get_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    value = (raw(name) or default).lower()
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


SECRET_KEY_MIN_LENGTH = 40
SECRET_KEY_MIN_DISTINCT = 10


def secret_key_problem(value: str) -> str | None:
    """Why a production SECRET_KEY is weak, or None.

    At least 40 characters (Render's `generateValue` is a base64-encoded
    256-bit value: 44 characters; Heroku's `secret` generator: 64 hex digits;
    `secrets.token_urlsafe(50)`: 67), at least 10 different characters, no
    spaces (a placeholder sentence such as "<generate: ...>"), and not a
    key marked insecure (Django's "django-insecure-" keys, this project's dev
    key). Django's own check (security.W009: 50 characters, 5 different) is
    silenced in app/settings.py because this one refuses at start instead.
    """
    if len(value) < SECRET_KEY_MIN_LENGTH:
        return f"it is {len(value)} characters long; use at least {SECRET_KEY_MIN_LENGTH} random characters"
    if len(set(value)) < SECRET_KEY_MIN_DISTINCT:
        return f"it has only {len(set(value))} different characters; use a random value"
    if any(c.isspace() for c in value):
        return "it contains spaces (a placeholder?); use a random value"
    if "insecure" in value.lower():
        return "it is marked insecure (a development or example key)"
    return None


METRICS_TOKEN_MIN_LENGTH = 32
# RFC 6750's token68: what may follow "Bearer " in an Authorization header.
_TOKEN68 = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~+/=")


def metrics_token_problem(value: str) -> str | None:
    """Why METRICS_TOKEN cannot be a scraper's bearer token, or None: at least
    32 characters (secrets.token_urlsafe(32) gives 43), at least 10 different,
    only the characters a bearer token may have."""
    if len(value) < METRICS_TOKEN_MIN_LENGTH:
        return f"it is {len(value)} characters long; use at least {METRICS_TOKEN_MIN_LENGTH} random characters"
    if set(value) - _TOKEN68:
        return "it has characters a bearer token cannot carry (use letters, digits and - . _ ~ + /)"
    if len(set(value)) < SECRET_KEY_MIN_DISTINCT:
        return f"it has only {len(set(value))} different characters; use a random value"
    return None
