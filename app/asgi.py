"""ASGI entry point: HTTP goes to Django, websockets to Channels."""
import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "app.settings")
django_asgi_app = get_asgi_application()  # before importing consumers: it sets Django up

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.sessions import CookieMiddleware  # noqa: E402

from app.channels_urls import router_patterns  # noqa: E402
from app.chat.guard import WebsocketGuard  # noqa: E402
from app.chat.session_scope import WebsocketAuthMiddleware, WebsocketSessionMiddleware  # noqa: E402
from app.observability.endpoint import Observability  # noqa: E402
from app.observability.logs import WebsocketUser  # noqa: E402

# Observability (app/observability/endpoint.py), outermost: /metrics for
# scrapers (a bearer token on the app port, none on METRICS_PORT) before any
# Host check, and a request/connection id for every log line.
application = Observability(ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        # WebsocketGuard (app/chat/guard.py): path, Host and Origin (scheme, host
        # and port) checked, handshakes per client address limited, all before
        # the session lookup; database/Redis down at the handshake answered with
        # an error frame and 1013 instead of a 500. Then Channels'
        # AuthMiddlewareStack, with a session middleware that leaves `send` alone
        # (app/chat/session_scope.py): nothing on a websocket saves a session;
        # both add to CookieMiddleware's copy of the scope instead of copying it again.
        "websocket": WebsocketGuard(CookieMiddleware(WebsocketSessionMiddleware(WebsocketAuthMiddleware(
            WebsocketUser(URLRouter(router_patterns)))))),
    }
))
