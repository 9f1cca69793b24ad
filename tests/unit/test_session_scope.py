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


@pytest.mark.django_db(transaction=True)  # the user is made on the database thread, outside a test transaction
async def test_session_and_user_go_into_this_connections_scope_without_more_copies():
    """Each copy lives as long as the socket (~0.45 KiB): Channels' AuthMiddleware made two."""
    from channels.db import database_sync_to_async
    from django.contrib.auth import login
    from django.contrib.auth.models import User
    from django.contrib.sessions.backends.db import SessionStore
    from django.test import RequestFactory

    from app.chat.session_scope import WebsocketAuthMiddleware

    @database_sync_to_async
    def logged_in_session_key():
        user = User.objects.create_user("alice", password="pw-unused-123")
        request = RequestFactory().get("/")
        request.session = SessionStore()
        login(request, user, backend="django.contrib.auth.backends.ModelBackend")
        request.session.save()
        return user.pk, request.session.session_key

    pk, key = await logged_in_session_key()
    seen = {}

    async def inner(scope, receive, send):
        seen["scope"], seen["user"] = scope, scope["user"].pk

    scope = {"type": "websocket", "cookies": {settings.SESSION_COOKIE_NAME: key}}
    await WebsocketSessionMiddleware(WebsocketAuthMiddleware(inner))(scope, None, None)
    assert seen["scope"] is scope and seen["user"] == pk
    scope = {"type": "websocket", "cookies": {}}
    await WebsocketSessionMiddleware(WebsocketAuthMiddleware(inner))(scope, None, None)
    assert seen["scope"] is scope and seen["user"] is None  # anonymous


def test_the_websocket_stack_uses_them():
    from app.asgi import application

    layers, app = [], application.app.application_mapping["websocket"]
    while app is not None:
        layers.append(type(app).__name__)
        app = getattr(app, "app", None) or getattr(app, "inner", None)
    assert layers[:5] == ["WebsocketGuard", "CookieMiddleware", "WebsocketSessionMiddleware",
                          "WebsocketAuthMiddleware", "WebsocketUser"], layers
