"""Websocket routes: a separate protocol, so a separate URLconf.

Reverse them with `app.websockets.websocket_reverse`; `urlpatterns` is the
name Django's reverse() looks for.
"""
from django.urls import path, re_path

from app.chat.consumers import ChatConsumer, RejectConsumer

websocket_urlpatterns = [
    path("ws/rooms/<int:room_id>/", ChatConsumer.as_asgi(), name="ws_group_chat"),
]
urlpatterns = websocket_urlpatterns

# Unknown paths are refused at the handshake instead of raising in the router.
router_patterns = [*websocket_urlpatterns, re_path(r"", RejectConsumer.as_asgi())]
