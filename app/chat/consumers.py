"""The room websocket: validate, store once, render once, fan out.

Every message has a seq, its number in the room (models.Message): gap-free
and committed in order, though two workers may *publish* them out of order.
Each socket keeps a watermark of what it was sent (delivery.Delivered).
A published message reaches each worker once; the worker's fan-out
(app/chat/layer.py) offers it to every local socket of the room (`offer`),
which writes it from a small outbox: no channel queue or dispatch-loop turn
per socket. Any other event goes through the channel queue as usual.

Reconnects miss nothing: the page connects with `?after=<seq>`, the highest
seq below which it shows every message (not the newest it shows: 100 may have
arrived before 99). The consumer joins the room group *before* it reads the
stored messages after that seq, so every message is either replayed or
arrives live; a message both replayed and published is sent once, and the
page drops one it already shows (a replay resends the ones it got early).

Redis restarts do not close sockets: when the worker's Redis connection comes
back, and every CHAT_RESYNC_INTERVAL seconds anyway, each socket is sent the
stored messages above its watermark that it has not sent (app/chat/resync.py).

Limits per user, across sockets, workers and hosts: a socket takes one of the
user's CHAT_MAX_SOCKETS_PER_USER slots at the handshake (app/chat/slots.py;
refused: error frame `too_many_sockets` + close 1008); every message takes a
token from the user's bucket (CHAT_USER_RATE_PER_SECOND, bursts of
CHAT_USER_RATE_BURST, in Redis: one round trip per received message, none per
delivered frame) after the socket's own bucket (CHAT_RATE_PER_SECOND, in the
process: it turns a flood away before it costs Redis anything).

A socket whose session, user or room is revoked (logout, password change,
deactivation, deletion) is closed by app/chat/revocation.py with an error
frame and 4401/4403/4404; it stores nothing after that.
"""
import asyncio
import collections
import contextvars
import json
import logging
import time

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings
from django.contrib.auth import HASH_SESSION_KEY

from app.chat import handshake_reads, layer, logfilters, resync, revocation, slots, throttle, wire
from app.chat.db_hops import NoIdleDatabaseHops
from app.chat.dispatch import LeanDispatch
from app.chat.guard import OUTAGE_ERRORS
from app.chat.delivery import Delivered
from app.chat.fan_out import fan_out
from app.chat.models import Message, Room
from app.chat.rendering import article_html, article_html_from, cursor_frame, error_frame, message_frame
from app.chat.writer import NotAdmitted, store_message
from app.observability import metrics

log = logging.getLogger(__name__)
logfilters.install()

# Seqs a socket holds above its watermark (sent while an older one is still
# missing). A hole this old is not going to fill (its publish was lost and no
# resync runs): the socket stops waiting for it and tells the client so.
MAX_EARLY = 4096

def log_failure(what: str, exc: Exception) -> None:
    """A backend outage is one warning line; anything else is a bug: traceback."""
    if isinstance(exc, OUTAGE_ERRORS):
        log.warning("%s (%s: %s)", what, type(exc).__name__, exc)
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


def drop_headers(scope) -> None:
    """Empty the handshake's header list once the socket is accepted: only the
    middleware reads it, at the handshake, yet every copy of the scope (one per
    middleware, alive as long as the socket) shares it: ~1.5 KiB per socket,
    the session cookie among it."""
    headers = scope.get("headers")
    if isinstance(headers, list):
        headers.clear()


TOO_MANY_SOCKETS = "You have {} chat connections open (at most {}); close a tab or window, then reload."
SENDING_TOO_FAST = "You are sending too fast; wait a moment."


def stored_after(room_id, after, limit):
    """(seq, id, article) of the newest `limit` stored messages with seq > after,
    oldest first. Seqs commit in order, so this is every message after `after`
    that exists (or the newest `limit` of them), never a set with a hole that
    a later commit fills."""
    rows = list(
        Message.objects.filter(room_id=room_id, seq__gt=after).select_related("author").order_by("-seq")[:limit]
    )
    return [(m.seq, m.id, article_html_from(m)) for m in reversed(rows)]


messages_after = database_sync_to_async(stored_after)


@database_sync_to_async
def load_connect_state(room_id, session, after, limit):
    """Everything the handshake reads from the database, in one thread hop
    (each hop is a turn in the worker's one database thread's queue, a pooled
    connection taken and given back, and a wake-up of the event loop):

    * the room (None: no such room);
    * the session key and auth hash the socket was opened with (what the
      revocation re-check compares later; the session was loaded by the
      authentication, so no query);
    * the replay: `start`, where the socket's watermark begins, and the
      stored messages after it (`stored_after`).

    Called after the socket joined the room group, so the room's last_seq
    read here bounds what the replay must send: a message with a higher seq
    commits after this read, is published after its commit, and so reaches
    the group member live. A page without a cursor (or with one at last_seq,
    the usual reconnect that missed nothing) therefore needs no message
    query at all: nothing stored can come after last_seq yet."""
    room = handshake_reads.room(Room, room_id)  # Room.objects.filter(pk=room_id).first(), as plain SQL
    if room is None:
        return None, None, None, None, []
    known = room.last_seq
    # A client claiming more than last_seq (a made-up value, another
    # database) would otherwise never be sent the messages up to its claim.
    start = known if after is None else min(after, known)
    rows = stored_after(room_id, start, limit) if start < known else []
    if session is None:
        return room, None, None, start, rows
    return room, session.session_key, session.get(HASH_SESSION_KEY), start, rows


# NoIdleDatabaseHops (app/chat/db_hops.py): no database-thread hop of Channels' own per handler.
# LeanDispatch (app/chat/dispatch.py): Channels' consumer loop with a task and ~2 KiB less per socket.
class ChatConsumer(LeanDispatch, NoIdleDatabaseHops, AsyncWebsocketConsumer):
    # Channels (>= 4.2) runs close_old_connections() on the worker's one
    # database thread before *every* handler: a thread hop per received frame
    # and per delivered message, queued with the INSERTs. These handlers reach
    # the database only through database_sync_to_async, which closes stale
    # connections itself (app/chat/db_hops.py).
    direct_types = NoIdleDatabaseHops.direct_types + ("chat.message",)

    # Set by the first close(). The revocation listener and the resync call
    # into a consumer from their own tasks, so a frame (an error frame, a
    # resync copy) can come after a close another task sent; Uvicorn raises
    # on anything sent after websocket.close (a traceback, seen under load).
    closing = False

    async def __call__(self, scope, receive, send):
        """Channels calls disconnect() only for a `websocket.disconnect` it
        handles. A consumer that ends with an exception instead never gets
        one: typically a client that leaves during the handshake, whose
        `accept` raises (Uvicorn: ClientDisconnected) after connect() took a
        socket slot and joined the room group. Without this, every such
        socket kept its slot (the user's limit, for the worker's life) and its
        group membership (the fan-out walks it for every message)."""
        try:
            await super().__call__(scope, receive, send)
        except asyncio.CancelledError:
            raise  # the server is stopping: what this process holds goes with it
        except BaseException:
            try:
                await self.disconnect(1006)  # idempotent: each step is, if it ran already
            except Exception:  # never in place of the error that ended the consumer
                log.exception("cleanup of a consumer that ended with an error failed")
            raise

    async def send(self, text_data=None, bytes_data=None, close=False):
        if self.closing:
            return
        await super().send(text_data, bytes_data, close)

    async def close(self, code=None, reason=None):
        if self.closing:
            return
        self.closing = True
        await super().close(code, reason)

    async def connect(self):
        self.revoked = None
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            metrics.handshake("unauthenticated")
            await self.close()  # before accept: the handshake gets HTTP 403
            return
        room_id = self.scope["url_route"]["kwargs"]["room_id"]
        # The slot and the group first, the database after (one hop,
        # load_connect_state): joining the group before the room's last_seq
        # is read is what lets the replay skip its query when it cannot find
        # anything. A room that does not exist gives both back below.
        self.group = room_group(room_id)
        self.user_id = user.pk
        self.username = user.get_username()
        self.delivered = None  # set by the replay; the resync skips the socket until then
        self.bucket = TokenBucket(settings.CHAT_RATE_PER_SECOND, settings.CHAT_RATE_BURST)
        try:
            allowed, held = await slots.acquire(self.user_id, self.channel_name, settings.CHAT_MAX_SOCKETS_PER_USER)
        except throttle.Unavailable as exc:
            self.group = None  # not joined
            log.warning("socket limit store unavailable (%s)", exc)
            await self.refuse_unavailable()
            return
        if not allowed:
            self.group = None  # not joined
            metrics.handshake("too_many_sockets")
            metrics.rate_limited("sockets")
            await self.accept()
            await self.send(text_data=error_frame(
                "too_many_sockets", TOO_MANY_SOCKETS.format(held, settings.CHAT_MAX_SOCKETS_PER_USER)))
            await self.close(code=1008)
            return
        self.slot = True
        try:
            await self.channel_layer.group_add(self.group, self.channel_name)
        except Exception as exc:
            log_failure("channel layer unavailable on connect", exc)
            await self.refuse_unavailable()
            return
        try:
            self.room, self.session_key, self.session_hash, start, rows = await load_connect_state(
                room_id, self.scope.get("session"), self.after_param(), settings.CHAT_HISTORY)
        except Exception as exc:
            log_failure("room lookup failed", exc)
            await self.refuse_unavailable()
            return
        if self.room is None:
            metrics.handshake("no_room")
            await self.disconnect(1000)  # the slot and the group membership back, now
            self.group = None
            await self.close()  # before accept: the handshake gets HTTP 403
            return
        self.session_tag = revocation.session_tag(self.session_key)
        await self.accept()  # raises if the client has gone: counted by the guard as client_gone
        metrics.handshake("accepted")
        drop_headers(self.scope)
        revocation.register(self)  # from here on logout & co. close it
        await self.replay(start, rows)

    async def refuse_unavailable(self):
        metrics.handshake("unavailable")
        await self.accept()
        await self.send(text_data=error_frame("unavailable", "The chat is unavailable; reconnecting."))
        await self.close(code=1013)  # "try again later": htmx-ext-ws reconnects

    async def revoke(self, reason: str) -> bool:
        """Close this socket for `reason` (revocation.CLOSE): an error frame the
        page shows, then the close code. Nothing it sends afterwards is stored."""
        if self.revoked:
            return False
        self.revoked = reason
        resync.unregister(self)  # nothing more is sent to it; disconnect() follows once the close completes
        code, text = revocation.CLOSE[reason]
        try:
            await self.send(text_data=error_frame(reason, text))
        finally:
            await self.close(code=code)
        return True

    async def replay(self, start, rows):
        """Send what load_connect_state read: the stored messages after the
        client's ?after= cursor (bounded by the room's last_seq)."""
        self.delivered = Delivered(start)
        # More than a page missed: the older ones are skipped on purpose.
        await self.catch_up(rows)
        resync.register(self)
        self.outbox = None  # a deque while frames wait (an empty one costs ~600 bytes per socket)
        self.outbox_task = None
        self.outbox_context = contextvars.copy_context()  # this socket's (log lines name its user)
        self.wire = self.scope.get(wire.SCOPE_KEY)  # None unless served by Uvicorn
        layer.register(self.channel_name, self.offer)

    def offer(self, event) -> bool:
        """The worker's fan-out (app/chat/layer.py) hands a room message to this
        socket directly: no queue and no dispatch-loop turn per socket. The frame
        goes into the outbox, which one short task per socket writes while it
        has frames. False: not a chat message, the regular path handles it."""
        if event.get("type") != "chat.message":
            return False
        if self.revoked or self.closing or not self.delivered.add(event["seq"]):
            return True  # closing, or sent already: nothing to do
        if self.outbox is None:
            # Nothing waits: the frame goes to the transport now when it can
            # (app/chat/wire.py), else it waits in order in the outbox.
            if (self.wire is not None and len(self.delivered.above) <= MAX_EARLY
                    and self.wire.write(wire.text_frame(event["html"]))):
                metrics.delivered()
                metrics.latency(event.get("at"))
                return True
            self.outbox = collections.deque()
        self.outbox.append(event)
        if self.outbox_task is None:
            self.outbox_task = asyncio.get_running_loop().create_task(self.write_outbox(), context=self.outbox_context)
        return True

    async def write_outbox(self):
        try:
            while self.outbox:
                event = self.outbox.popleft()
                await self.send(text_data=event["html"])
                metrics.delivered()
                metrics.latency(event.get("at"))
                early = self.delivered.above
                if len(early) > MAX_EARLY:
                    await self.skip_to(min(early) - 1)
        except Exception as exc:  # the connection went away meanwhile: the close cleans up
            log.debug("outbox of %s stopped (%s: %s)", self.channel_name, type(exc).__name__, exc)
        finally:
            self.outbox = self.outbox_task = None

    async def accept(self, subprotocol=None, headers=None):
        await super().accept(subprotocol, headers)
        self.counted = True  # an open socket until disconnect()
        metrics.socket_opened()

    async def deliver(self, seq, frame) -> bool:
        """Send a message frame unless this socket was sent that seq already."""
        if self.revoked or not self.delivered.add(seq):
            return False
        await self.send(text_data=frame)
        metrics.delivered()
        early = self.delivered.above
        if len(early) > MAX_EARLY:
            await self.skip_to(min(early) - 1)
        return True

    async def skip_to(self, seq) -> None:
        if self.delivered.advance_to(seq):
            await self.send(text_data=cursor_frame(seq))

    async def catch_up(self, rows) -> int:
        """Send the rows (messages_after: every stored message of the room after
        some seq <= this socket's watermark, or the newest of them) that this
        socket was not sent; used by the replay and the resync.

        No guessing: seqs are gap-free and commit in order, so the rows are all
        that exists up to the last one, and the watermark moves there. A stored
        message not in the rows has a higher seq and is still on its way
        (published after its commit, or sent by the next resync)."""
        if not rows:
            return 0
        sent = 0
        try:
            await self.skip_to(rows[0][0] - 1)  # older ones were cut off by the read's limit
            for seq, _, article in rows:
                sent += await self.deliver(seq, message_frame(article))
            await self.skip_to(rows[-1][0])  # holes among the rows: deleted messages
        except Exception:  # the socket closed meanwhile
            pass
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
        layer.unregister(getattr(self, "channel_name", None))
        outbox_task = getattr(self, "outbox_task", None)
        if outbox_task is not None:
            outbox_task.cancel()
        if getattr(self, "counted", False):
            self.counted = False
            metrics.socket_closed()
        resync.unregister(self)
        revocation.unregister(self)
        if getattr(self, "slot", False):
            self.slot = False
            await slots.release(self.user_id, self.channel_name)
        group = getattr(self, "group", None)
        if group:
            try:
                await self.channel_layer.group_discard(group, self.channel_name)
            except Exception as exc:  # Redis down: the subscription is pruned when it is back
                log_failure(f"group_discard failed for {group}", exc)

    async def receive(self, text_data=None, bytes_data=None):
        if self.revoked:
            return
        try:
            if not self.bucket.take():
                metrics.rate_limited("frame")
                raise FrameError("rate_limited", SENDING_TOO_FAST)
            body = parse_frame(text_data, bytes_data)
        except FrameError as err:
            metrics.rejected(err.code)
            await self.send(text_data=error_frame(err.code, err.text))
            return
        # The per-user budget (a Redis round trip) is asked while the message
        # waits for the writer, not before it: the writer holds the message
        # until the answer and writes it only on a yes (app/chat/writer.py).
        admission = asyncio.ensure_future(self.admit())
        try:
            message = await store_message(self.room.pk, self.scope["user"].pk, body, admission)
        except NotAdmitted as refused:
            if refused.reason == "rate_limited":
                metrics.rejected("rate_limited")
                await self.send(text_data=error_frame("rate_limited", SENDING_TOO_FAST))
            return  # "revoked": nothing more is sent to it
        except Exception as exc:  # the database is down: nothing was written
            log_failure("storing a message failed", exc)
            metrics.rejected("not_saved")
            await self.send(text_data=error_frame("not_saved", "Your message was not saved; try again."))
            return
        frame = message_frame(article_html(message.id, message.seq, self.username, body, message.created_at.isoformat()))
        event = {"type": "chat.message", "id": message.id, "seq": message.seq, "html": frame,
                 "at": message.created_at.timestamp()}
        try:
            await fan_out(self.channel_layer, self.group, event)
        except Exception as exc:
            # Stored, so every socket gets it from the resync once Redis is
            # back (or from the replay when it reconnects); the sender sees it now.
            log_failure(f"fan-out failed for message {message.id}", exc)
            await self.deliver(message.seq, frame)

    async def admit(self) -> str | None:
        """Whether a received message may be written: None, or why not."""
        if not (await throttle.ahit_or_local(throttle.user_messages(), self.user_id)).allowed:
            return "rate_limited"
        if self.revoked:  # revoked while the budget was asked for
            return "revoked"
        return None

    async def chat_message(self, event):
        if await self.deliver(event["seq"], event["html"]):
            metrics.latency(event.get("at"))


class RejectConsumer(AsyncWebsocketConsumer):
    """Any websocket path that is not a route: refused at the handshake (403)."""

    async def connect(self):
        metrics.handshake("bad_path")
        await self.close()
