"""No idle trips to the database thread when a socket opens or closes.

Each worker runs the ORM on one thread (thread-sensitive sync_to_async), so
every hop to it waits behind all the others, and while the event loop is busy
a hop waits for the GIL too (up to the 5 ms switch interval). Channels (>= 4.2)
adds a hop of its own around the handlers, `aclose_old_connections()`: before
every handler in `AsyncConsumer.dispatch`, and once more at the end of
`AsyncWebsocketConsumer.websocket_disconnect`. A socket that connects and
closes made three of them, next to the three that did work then (the session
and user, the room, the replay; the room and the replay are one hop now,
app/chat/consumers.py load_connect_state): half of the database thread's queue.

Under a churn of reconnects that queue set the pace: at 100 reconnects/s (two
workers, issue #13's churn soak) the workers completed about 70/s, the
sockets waiting for the thread piled up (hundreds per worker, most of them in
`aclose_old_connections`), and the workers' RSS grew with that pile: to the
high-water mark of sockets in flight, raised again by every burst of noise on
the machine (+10 MiB/min and more over 2-minute soaks). Nothing per socket
outlived the socket.

The hops are redundant for the chat consumer: it reaches the database only
through `database_sync_to_async` (channels.db.DatabaseSyncToAsync), which
runs `close_old_connections()` itself on the database thread before and after
each call, as does Channels' AuthMiddleware for the session and the user. So
this mixin dispatches `websocket.connect`, `websocket.disconnect` and
`websocket.receive` without them, and any event type a consumer adds to
`direct_types` (app/chat/consumers.py: `chat.message`).

tests/unit/test_db_hops.py counts the hops of a connect, a close and a message.
"""
from __future__ import annotations

from channels.exceptions import InvalidChannelLayerError, StopConsumer


class NoIdleDatabaseHops:
    """Mixin for an AsyncWebsocketConsumer whose database work all goes
    through database_sync_to_async: listed before the consumer base class."""

    # Message types handled without Channels' hop; a consumer adds its own
    # event types whose handlers reach the database only through database_sync_to_async.
    direct_types = ("websocket.connect", "websocket.disconnect", "websocket.receive")

    async def dispatch(self, message):
        kind = message["type"]
        if kind in self.direct_types:
            await getattr(self, kind.replace(".", "_"))(message)
        else:
            await super().dispatch(message)

    async def websocket_disconnect(self, message):
        """Channels' AsyncWebsocketConsumer.websocket_disconnect without its
        trailing `aclose_old_connections()`."""
        try:
            for group in self.groups:
                await self.channel_layer.group_discard(group, self.channel_name)
        except AttributeError:
            raise InvalidChannelLayerError("BACKEND is unconfigured or doesn't support groups") from None
        await self.disconnect(message["code"])
        raise StopConsumer()
