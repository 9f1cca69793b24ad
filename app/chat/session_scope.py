"""The session of a websocket handshake, read-only: Channels' SessionMiddleware
without its wrapper around `send`.

Channels' SessionMiddleware wraps `send` so that an `http.response.start`
can save a modified session and set its cookie. A websocket never sends that
message, and no consumer here writes to the session, yet the wrapper ran on
every frame sent (a proxied `session.modified` and `is_empty()` per delivered
frame). This middleware puts the same session object in the scope (looked up
lazily by AuthMiddleware, from the same cookie) and passes `send` through.

Every copy of the scope a middleware makes lives as long as the socket (its
coroutine frame holds it), ~0.45 KiB each. WebsocketSessionMiddleware adds
the session to the copy CookieMiddleware made for this connection, and
WebsocketAuthMiddleware (Channels' AuthMiddleware: the same user, resolved the
same way) adds the user to it too, instead of three more copies (bench/README.md
"Memory per socket").
"""
from __future__ import annotations

from channels.auth import AuthMiddleware
from channels.db import database_sync_to_async
from django.conf import settings

from app.chat import handshake_reads

get_user = database_sync_to_async(handshake_reads.get_user)


class WebsocketSessionMiddleware:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if "cookies" not in scope:
            raise ValueError("No cookies in scope: WebsocketSessionMiddleware needs to run inside CookieMiddleware.")
        # The database store reading its row with plain SQL (app/chat/handshake_reads.py).
        store = handshake_reads.session_store()
        # CookieMiddleware's copy, made for this connection: no copy of our own.
        scope["session"] = store(scope["cookies"].get(settings.SESSION_COOKIE_NAME))
        return await self.app(scope, receive, send)


class WebsocketAuthMiddleware(AuthMiddleware):
    """Channels' AuthMiddleware in the scope it is given, which must be this
    connection's own (inside WebsocketSessionMiddleware): Channels' copies it
    and its BaseMiddleware copies it again."""

    async def resolve_scope(self, scope):
        # Channels' get_user, the user row read with plain SQL (app/chat/handshake_reads.py).
        scope["user"]._wrapped = await get_user(scope)

    async def __call__(self, scope, receive, send):
        self.populate_scope(scope)
        await self.resolve_scope(scope)
        return await self.inner(scope, receive, send)
