"""The room websocket: validate, store once, render once, fan out.

Reconnects miss nothing: the client connects with `?after=<last id it shows>`
and the consumer joins the room group *before* it reads the stored messages
after that id, so every message is either replayed or arrives live; ids seen
in the replay are dropped from the live stream, so none arrives twice.

Redis restarts do not close sockets: each consumer remembers the ids it sent
and, when the worker's Redis connection comes back, sends what it missed from
the database (app/chat/resync.py).
"""
import json
import logging
import time
from collections import deque

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings

from app.chat import logfilters, resync
from app.chat.guard import OUTAGE_ERRORS
from app.chat.models import Message, Room
from app.chat.rendering import article_html, article_html_from, error_frame, message_frame
from app.chat.writer import store_message

log = logging.getLogger(__name__)
logfilters.install()

# Ids a socket remembers having sent; larger than CHAT_RESYNC_LIMIT so that a
# resync never sends one of the newest messages twice.
RECENT_IDS = 4096

def log_failure(what: str, exc: Exception) -> None:
    """A backend outage is one warning line; anything else is a bug: traceback."""
    if isinstance(exc, OUTAGE_ERRORS):
        log.warning("%s (%s)", what, type(exc).__name__)
    else:
        log.exception(what)


# A JSON frame from htmx-ext-ws carries the form fields plus a HEADERS object.
FRAME_OVERHEAD = 4096


def room_group(room_id: int) -> str:
    return f"chat.room.{room_id}"


class TokenBucket:
    """Per-connection rate limit: `rate` frames a second, bursts of `burst`."""

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, burst
        self.tokens, self.stamp = float(burst), time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class FrameError(Exception):
    def __init__(self, code: str, text: str):
        super().__init__(text)
        self.code, self.text = code, text


def parse_frame(text_data, bytes_data) -> str:
    """Return the message body of a frame, or raise FrameError saying why not."""
    limit = settings.CHAT_MAX_MESSAGE_LENGTH
    if text_data is None:
        raise FrameError("binary", "Binary frames are not accepted; send JSON text.")
    if len(text_data) > limit * 6 + FRAME_OVERHEAD:  # worst case: every character \u-escaped
        raise FrameError("too_long", f"Message too long (at most {limit} characters).")
    try:
        data = json.loads(text_data)
    except (ValueError, RecursionError):
        raise FrameError("bad_json", "Frames must be a JSON object.") from None
    if not isinstance(data, dict):
        raise FrameError("bad_json", "Frames must be a JSON object.")
    body = data.get("message")
    if not isinstance(body, str):
        raise FrameError("missing_message", 'The frame needs a "message" text field.')
    body = body.strip()
    if not body:
        raise FrameError("empty", "Empty messages are not sent.")
    if len(body) > limit:
        raise FrameError("too_long", f"Message too long (at most {limit} characters).")
    if "\x00" in body:
        raise FrameError("bad_text", "Messages cannot contain NUL characters.")
    try:
        body.encode("utf-8")
    except UnicodeEncodeError:
        raise FrameError("bad_text", "Messages must be valid Unicode text.") from None
    return body


@database_sync_to_async
def load_room(room_id):
    return Room.objects.filter(pk=room_id).first()


@database_sync_to_async
def messages_after(room_id, after, limit):
    rows = list(
        Message.objects.filter(room_id=room_id, id__gt=after).select_related("author").order_by("-id")[:limit]
    )
    return [(m.id, article_html_from(m)) for m in reversed(rows)]


@database_sync_to_async
def messages_for_resync(room_id, after, limit):
    """Like messages_after, with each message's creation time (epoch seconds)."""
    rows = list(
        Message.objects.filter(room_id=room_id, id__gt=after).select_related("author").order_by("-id")[:limit]
    )
    return [(m.id, article_html_from(m), m.created_at.timestamp()) for m in reversed(rows)]


@database_sync_to_async
def latest_id(room_id):
    row = Message.objects.filter(room_id=room_id).order_by("-id").values_list("id", flat=True)[:1]
    return row[0] if row else 0


class ChatConsumer(AsyncWebsocketConsumer):
    async def dispatch(self, message):
        # Channels (>= 4.2) runs close_old_connections() on the worker's one
        # database thread before *every* handler: a thread hop per delivered
        # frame (20 per message in a room of 20), queued with the INSERTs.
        # These handlers reach the database only through database_sync_to_async,
        # which closes stale connections itself, so the hot ones skip it.
        if message["type"] in ("chat.message", "websocket.receive"):
            handler = getattr(self, message["type"].replace(".", "_"))
            await handler(message)
        else:
            await super().dispatch(message)

    async def connect(self):
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close()  # before accept: the handshake gets HTTP 403
            return
        room_id = self.scope["url_route"]["kwargs"]["room_id"]
        try:
            self.room = await load_room(room_id)
        except Exception as exc:
            log_failure("room lookup failed", exc)
            await self.accept()
            await self.send(text_data=error_frame("unavailable", "The chat is unavailable; reconnecting."))
            await self.close(code=1013)
            return
        if self.room is None:
            await self.close()
            return
        self.group = room_group(self.room.pk)
        self.username = user.get_username()
        self.sent_ids, self.sent_order = set(), deque()
        self.recent_cap = max(RECENT_IDS, 2 * settings.CHAT_RESYNC_LIMIT)
        self.base = None  # resync floor: set once the replay is done
        self.bucket = TokenBucket(settings.CHAT_RATE_PER_SECOND, settings.CHAT_RATE_BURST)
        try:
            await self.channel_layer.group_add(self.group, self.channel_name)
        except Exception as exc:
            log_failure("channel layer unavailable on connect", exc)
            await self.accept()
            await self.send(text_data=error_frame("unavailable", "The chat is unavailable; reconnecting."))
            await self.close(code=1013)  # "try again later": htmx-ext-ws reconnects
            return
        await self.accept()
        await self.replay()

    async def replay(self):
        after = self.after_param()
        try:
            if after is None:
                rows, base = [], await latest_id(self.room.pk)
            else:
                rows = await messages_after(self.room.pk, after, settings.CHAT_HISTORY)
                # More than a page missed: the older ones are skipped on purpose.
                base = rows[0][0] - 1 if len(rows) >= settings.CHAT_HISTORY else after
        except Exception as exc:
            log_failure("replay failed", exc)
            await self.send(text_data=error_frame("unavailable", "Could not load missed messages; reconnecting."))
            await self.close(code=1013)
            return
        for message_id, article in rows:
            await self.deliver(message_id, message_frame(article))
        self.base = base
        resync.register(self)

    def remember(self, message_id) -> bool:
        """Record an id as sent; False if it was sent already."""
        if message_id in self.sent_ids:
            return False
        if len(self.sent_order) >= self.recent_cap:
            self.sent_ids.discard(self.sent_order.popleft())
        self.sent_order.append(message_id)
        self.sent_ids.add(message_id)
        return True

    async def deliver(self, message_id, frame) -> bool:
        if not self.remember(message_id):
            return False
        await self.send(text_data=frame)
        return True

    async def catch_up(self, rows, settled_before: float) -> int:
        """Send stored messages this socket missed (resync: app/chat/resync.py).

        The floor only moves past messages created before `settled_before`: a
        younger one may have a smaller id than a message still being written."""
        sent = 0
        top = self.base
        for message_id, article, created in rows:
            if created < settled_before:
                top = max(top, message_id)
            if message_id > self.base and message_id not in self.sent_ids:
                try:
                    sent += await self.deliver(message_id, message_frame(article))
                except Exception:  # the socket closed meanwhile
                    return sent
        self.base = top
        return sent

    def after_param(self):
        from urllib.parse import parse_qs

        values = parse_qs(self.scope.get("query_string", b"").decode("latin-1")).get("after")
        if not values:
            return None
        try:
            after = int(values[0])
        except ValueError:
            return None
        return after if after >= 0 else None

    async def disconnect(self, code):
        resync.unregister(self)
        group = getattr(self, "group", None)
        if group:
            try:
                await self.channel_layer.group_discard(group, self.channel_name)
            except Exception as exc:  # Redis down: the subscription is pruned when it is back
                log_failure(f"group_discard failed for {group}", exc)

    async def receive(self, text_data=None, bytes_data=None):
        try:
            if not self.bucket.take():
                raise FrameError("rate_limited", "You are sending too fast; wait a moment.")
            body = parse_frame(text_data, bytes_data)
        except FrameError as err:
            await self.send(text_data=error_frame(err.code, err.text))
            return
        try:
            message = await store_message(self.room.pk, self.scope["user"].pk, body)
        except Exception as exc:  # the database is down: nothing was written
            log_failure("storing a message failed", exc)
            await self.send(text_data=error_frame("not_saved", "Your message was not saved; try again."))
            return
        frame = message_frame(article_html(message.id, self.username, body, message.created_at.isoformat()))
        try:
            await self.channel_layer.group_send(self.group, {"type": "chat.message", "id": message.id, "html": frame})
        except Exception as exc:
            # Stored, so every socket gets it from the resync once Redis is
            # back (or from the replay when it reconnects); the sender sees it now.
            log_failure(f"fan-out failed for message {message.id}", exc)
            await self.deliver(message.id, frame)

    async def chat_message(self, event):
        await self.deliver(event["id"], event["html"])


class RejectConsumer(AsyncWebsocketConsumer):
    """Any websocket path that is not a route: refused at the handshake (403)."""

    async def connect(self):
        await self.close()
