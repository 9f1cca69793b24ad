"""The outermost websocket middleware: bad Host refused, outages answered.

* Django checks Host against ALLOWED_HOSTS for HTTP only; a websocket with a
  Host that is not allowed is refused at the handshake (HTTP 403), like a
  foreign Origin. So is a path that is not in canonical form ("//ws/...",
  "/./", "/../"): Channels' router would otherwise strip the extra slash.
* The session lookup (AuthMiddlewareStack) and the channel subscription
  (`new_channel`) happen before the consumer runs; if the database or Redis
  is down there, the client gets an error frame (`data-error="unavailable"`)
  and close code 1013 (try again later: the page reconnects with ?after=),
  and the log gets one line instead of an "Exception in ASGI application"
  traceback and an HTTP 500 / close 1011.
* A handshake without a Host header, or whose Origin is not one of this
  site's origins (scheme, host and port: app/chat/origin.py), is refused
  with HTTP 403.
* Handshakes per client address are limited (CHAT_ADDRESS_HANDSHAKES_PER_MINUTE,
  shared in Redis: app/chat/throttle.py) before the session lookup, the first
  step that costs a database query. Over the limit the handshake gets HTTP
  429 with Retry-After, before accept, through the ASGI "websocket.http.response"
  extension (Uvicorn's websockets-sansio protocol, the production one, offers
  it); a server without it (Daphne, dev only) gets an error frame
  (`data-error="too_many_connections"`) and close 1008. If Redis cannot be
  reached the limit refuses like any outage: error frame + 1013.
"""
from __future__ import annotations

import asyncio
import logging

from django.conf import settings
from django.db import Error as DatabaseError
from django.http.request import split_domain_port, validate_host

from app.chat import origin, throttle, wire
from app.chat.rendering import error_frame
from app.observability import metrics

log = logging.getLogger(__name__)

UNAVAILABLE = "The chat is unavailable; reconnecting."


def _outage_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [DatabaseError, OSError, asyncio.TimeoutError]
    try:
        from redis.exceptions import RedisError

        errors.append(RedisError)
    except ImportError:  # pragma: no cover - redis is in the production lock
        pass
    try:
        from psycopg import Error as PsycopgError

        errors.append(PsycopgError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


OUTAGE_ERRORS = _outage_errors()


def _client_gone_errors() -> tuple[type[BaseException], ...]:
    # Uvicorn's accept/send raise ClientDisconnected (an OSError, so it would
    # otherwise read as an outage) once the client has closed the connection.
    try:
        from uvicorn.protocols.utils import ClientDisconnected
    except ImportError:  # pragma: no cover - Uvicorn is in both locks
        return ()
    return (ClientDisconnected,)


CLIENT_GONE_ERRORS = _client_gone_errors()
TOO_MANY = "Too many connection attempts from your address; retry in {} s."


async def refuse(send, why: str):
    metrics.handshake(why)
    await send({"type": "websocket.close", "code": 1008})  # before accept: HTTP 403


async def too_many(scope, receive, send, retry_after: int):
    metrics.handshake("rate_limited")
    text = TOO_MANY.format(retry_after)
    if "websocket.http.response" in scope.get("extensions", {}):
        await send({"type": "websocket.http.response.start", "status": 429,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                (b"retry-after", str(retry_after).encode())]})
        await send({"type": "websocket.http.response.body", "body": text.encode()})
        return
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    await send({"type": "websocket.send", "text": error_frame("too_many_connections", text)})
    await send({"type": "websocket.close", "code": 1008})


class WebsocketGuard:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "websocket":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if "//" in path or "/./" in path or "/../" in path or path.endswith(("/.", "/..")):
            return await refuse(send, "bad_path")
        host = origin.header(scope, b"host")
        if host is None:
            return await refuse(send, "bad_host")
        domain, _port = split_domain_port(host)
        if not domain or not validate_host(domain, settings.ALLOWED_HOSTS):
            return await refuse(send, "bad_host")
        if not origin.allowed(scope):
            return await refuse(send, "bad_origin")
        state = {"accepted": False, "closed": False, "connect_read": False}

        async def tracked_receive():
            message = await receive()
            if message.get("type") == "websocket.connect":
                state["connect_read"] = True
            return message

        async def tracked_send(message):
            await send(message)  # first: an accept that raised (the client left) accepted nothing
            kind = message.get("type")
            if kind == "websocket.accept":
                state["accepted"] = True
            elif kind in ("websocket.close", "websocket.http.response.start"):
                state["closed"] = True

        try:
            verdict = await throttle.ahit(throttle.handshakes(), throttle.scope_address(scope))
            if not verdict.allowed:
                return await too_many(scope, receive, send, verdict.retry_after)
            # wire.attach: Uvicorn's connection for the fan-out's direct writes (app/chat/wire.py).
            return await self.app(wire.attach(scope, send), tracked_receive, tracked_send)
        except CLIENT_GONE_ERRORS:
            # The client left (typically during the handshake, while connect()
            # read the database): nobody to answer, nothing is wrong on our side.
            # The consumer has given back what it took (ChatConsumer.__call__).
            if not state["accepted"]:
                metrics.handshake("client_gone")
            log.debug("websocket %s: the client left", scope.get("path"))
            return
        except (*OUTAGE_ERRORS, throttle.Unavailable) as exc:
            if state["closed"]:
                raise
            log.warning("websocket %s: backend unavailable (%s: %s)", scope.get("path"), type(exc).__name__,
                        str(exc).splitlines()[0][:200] if str(exc) else "")
            if not state["accepted"]:
                metrics.handshake("unavailable")
            try:
                if not state["accepted"]:
                    if not state["connect_read"]:
                        await receive()
                    await send({"type": "websocket.accept"})
                await send({"type": "websocket.send", "text": error_frame("unavailable", UNAVAILABLE)})
                await send({"type": "websocket.close", "code": 1013})
            except Exception:  # the client went away meanwhile
                pass
