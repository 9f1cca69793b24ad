"""app/chat/session_scope.py: the handshake's session in the scope, `send` untouched."""
import pytest
from django.conf import settings

from app.chat.session_scope import WebsocketSessionMiddleware


async def run(scope):
    seen = {}

    async def inner(scope, receive, send):
        seen.update(scope=scope, send=send)

    async def send(message):
        pass

    await WebsocketSessionMiddleware(inner)(scope, None, send)
    return seen, send


async def test_the_session_of_the_cookie_is_in_the_scope_and_send_is_passed_through():
    seen, send = await run({"type": "websocket", "cookies": {settings.SESSION_COOKIE_NAME: "k" * 32}})
    assert seen["scope"]["session"].session_key == "k" * 32
    assert seen["send"] is send  # no wrapper per frame
    seen, _ = await run({"type": "websocket", "cookies": {}})  # no cookie: an empty, anonymous session
    assert seen["scope"]["session"].session_key is None


async def test_without_cookie_middleware_it_refuses_to_guess():
    with pytest.raises(ValueError, match="CookieMiddleware"):
        await run({"type": "websocket"})
