"""LOG_FORMAT=json: one JSON object per line, for a log pipeline to parse.

Every record (Django's, gunicorn's, Uvicorn's access and error logs, the
chat's) becomes

    {"ts": "2026-12-02T10:00:00.123Z", "level": "INFO", "logger": "uvicorn.access",
     "message": "...", "pid": 4242, "request_id": "...", "user_id": 7, ...}

with, where known: `request_id` (an HTTP request: the incoming X-Request-ID
when it is a plain token, as Heroku's router and the Ansible role's nginx
send, else a new one), `connection_id` (a websocket, for its whole life),
`user_id` (after authentication), the access fields `client`, `method`,
`path`, `status`, and `exc` (a traceback as one string). Nothing else from
the record is copied: no headers, cookies or request bodies, so the JSON
log holds no more than the plain one (tests/faults/test_supply_chain.py
scans both for secrets).

The ids live in context variables set by the outermost ASGI layer
(app/observability/endpoint.py) and, for the user, by `UserMiddleware`
(HTTP, after Django's AuthenticationMiddleware) and `WebsocketUser` (inside
Channels' AuthMiddlewareStack). Each request and each websocket runs in its
own task, so the values never leak from one to another.
"""
from __future__ import annotations

import contextvars
import json
import logging
import re
import secrets
from datetime import datetime, timezone

from asgiref.sync import iscoroutinefunction, markcoroutinefunction

FORMATS = ("plain", "json")
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{8,128}")

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
connection_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("connection_id", default=None)
user_id: contextvars.ContextVar[int | None] = contextvars.ContextVar("user_id", default=None)


def new_id() -> str:
    return secrets.token_hex(8)


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers") or ():
        if key == name:
            return value.decode("latin-1")
    return None


def bind(scope) -> list:
    """Set the ids of an ASGI connection; returns what `unbind` needs."""
    if scope["type"] == "websocket":
        return [connection_id.set(new_id())]
    given = _header(scope, b"x-request-id")
    return [request_id.set(given if given and REQUEST_ID.fullmatch(given) else new_id())]


def unbind(tokens) -> None:
    for token in reversed(tokens):
        token.var.reset(token)


def set_user(pk) -> None:
    user_id.set(pk)


def _access_fields(record: logging.LogRecord) -> dict:
    args = record.args if isinstance(record.args, tuple) else ()
    if record.name == "uvicorn.access" and len(args) == 5:
        client, method, path, _version, status = args
        return {"client": client, "method": method, "path": path, "status": status}
    if isinstance(record.msg, str) and record.msg.startswith('%s - "WebSocket %s"') and len(args) >= 2:
        fields = {"client": args[0], "method": "WEBSOCKET", "path": args[1]}
        if len(args) == 3:
            fields["status"] = args[2]
        elif record.msg.endswith("[accepted]"):
            fields["status"] = 101
        return fields
    return {}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")
                  .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        for key, var in (("request_id", request_id), ("connection_id", connection_id), ("user_id", user_id)):
            value = var.get()
            if value is not None:
                entry[key] = value
        entry.update(_access_fields(record))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


FORMATTERS = {
    "plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"},
    "json": {"()": "app.observability.logs.JsonFormatter"},
}


def gunicorn_logconfig(log_format: str, level: str) -> dict | None:
    """gunicorn's `logconfig_dict` for LOG_FORMAT=json (None: gunicorn's own plain
    format). The Uvicorn workers give uvicorn.error and uvicorn.access these
    same handlers (uvicorn_worker copies them), so the access log is JSON too."""
    if log_format != "json":
        return None
    handler = {"class": "logging.StreamHandler", "formatter": "json"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": FORMATTERS["json"]},
        "handlers": {
            "error_console": {**handler, "stream": "ext://sys.stderr"},
            "console": {**handler, "stream": "ext://sys.stdout"},
        },
        "root": {"level": level.upper(), "handlers": ["console"]},
        "loggers": {
            "gunicorn.error": {"level": level.upper(), "handlers": ["error_console"], "propagate": False},
            "gunicorn.access": {"level": "INFO", "handlers": ["console"], "propagate": False},
        },
    }


class UserMiddleware:
    """After AuthenticationMiddleware: the signed-in user's id for the log lines
    of this request (the access line included)."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response):
        self.get_response = get_response
        self.async_mode = iscoroutinefunction(get_response)
        if self.async_mode:
            markcoroutinefunction(self)

    def __call__(self, request):
        if self.async_mode:
            return self.__acall__(request)
        user = getattr(request, "user", None)
        if user is not None and user.is_authenticated:
            set_user(user.pk)
        return self.get_response(request)

    async def __acall__(self, request):
        auser = getattr(request, "auser", None)
        if auser is not None:
            user = await auser()
            if user.is_authenticated:
                set_user(user.pk)
        return await self.get_response(request)


class WebsocketUser:
    """Inside Channels' AuthMiddlewareStack (the user is resolved by then):
    the user's id for every log line of the websocket."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        user = scope.get("user")
        if user is not None and user.is_authenticated:
            set_user(user.pk)
        return await self.app(scope, receive, send)
