"""The room websocket: validate, store once, render once, fan out.

Reconnects miss nothing: the client connects with `?after=<last id it shows>`
and the consumer joins the room group *before* it reads the stored messages
after that id, so every message is either replayed or arrives live; ids seen
in the replay are dropped from the live stream, so none arrives twice.
"""
import json
import logging
import time

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings

from app.chat.models import Message, Room
from app.chat.rendering import article_html, article_html_from, error_frame, message_frame

log = logging.getLogger(__name__)

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
def store_message(room_id, user_id, body):
    return Message.objects.create(room_id=room_id, author_id=user_id, body=body)


class ChatConsumer(AsyncWebsocketConsumer):
    async def connect(self):
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close()  # before accept: the handshake gets HTTP 403
            return
        room_id = self.scope["url_route"]["kwargs"]["room_id"]
        try:
            self.room = await load_room(room_id)
        except Exception:
            log.exception("room lookup failed")
            await self.accept()
            await self.send(text_data=error_frame("unavailable", "The chat is unavailable; reconnecting."))
            await self.close(code=1013)
            return
        if self.room is None:
            await self.close()
            return
        self.group = room_group(self.room.pk)
        self.username = user.get_username()
        self.replayed = set()
        self.bucket = TokenBucket(settings.CHAT_RATE_PER_SECOND, settings.CHAT_RATE_BURST)
        try:
            await self.channel_layer.group_add(self.group, self.channel_name)
        except Exception:
            log.exception("channel layer unavailable on connect")
            await self.accept()
            await self.send(text_data=error_frame("unavailable", "The chat is unavailable; reconnecting."))
            await self.close(code=1013)  # "try again later": htmx-ext-ws reconnects
            return
        await self.accept()
        await self.replay()

    async def replay(self):
        after = self.after_param()
        if after is None:
            return
        try:
            rows = await messages_after(self.room.pk, after, settings.CHAT_HISTORY)
        except Exception:
            log.exception("replay failed")
            await self.send(text_data=error_frame("unavailable", "Could not load missed messages; reconnecting."))
            await self.close(code=1013)
            return
        for message_id, article in rows:
            self.replayed.add(message_id)
            await self.send(text_data=message_frame(article))

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
        group = getattr(self, "group", None)
        if group:
            try:
                await self.channel_layer.group_discard(group, self.channel_name)
            except Exception:
                log.warning("group_discard failed for %s", group, exc_info=True)

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
        except Exception:
            log.exception("storing a message failed")
            await self.send(text_data=error_frame("not_saved", "Your message was not saved; try again."))
            return
        frame = message_frame(article_html(message.id, self.username, body, message.created_at.isoformat()))
        try:
            await self.channel_layer.group_send(self.group, {"type": "chat.message", "id": message.id, "html": frame})
        except Exception:
            # Stored, so every client gets it on its next reconnect replay;
            # the sender sees it now.
            log.exception("fan-out failed for message %s", message.id)
            await self.send(text_data=frame)

    async def chat_message(self, event):
        if event["id"] in self.replayed:
            self.replayed.discard(event["id"])
            return
        await self.send(text_data=event["html"])


class RejectConsumer(AsyncWebsocketConsumer):
    """Any websocket path that is not a route: refused at the handshake (403)."""

    async def connect(self):
        await self.close()
