"""The session of a websocket handshake, read-only: Channels' SessionMiddleware
without its wrapper around `send`.

Channels' SessionMiddleware wraps `send` so that an `http.response.start`
can save a modified session and set its cookie. A websocket never sends that
message, and no consumer here writes to the session, yet the wrapper ran on
every frame sent (a proxied `session.modified` and `is_empty()` per delivered
frame). This middleware puts the same session object in the scope (looked up
lazily by AuthMiddleware, from the same cookie) and passes `send` through.
"""
from __future__ import annotations

from importlib import import_module

from django.conf import settings


class WebsocketSessionMiddleware:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if "cookies" not in scope:
            raise ValueError("No cookies in scope: WebsocketSessionMiddleware needs to run inside CookieMiddleware.")
        store = import_module(settings.SESSION_ENGINE).SessionStore
        session = store(scope["cookies"].get(settings.SESSION_COOKIE_NAME))
        return await self.app(dict(scope, session=session), receive, send)
