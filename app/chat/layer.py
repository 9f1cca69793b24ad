"""The production channel layer: channels_redis' PubSub layer, with a room's
fan-out done once per worker instead of once per socket.

With the library's layer, a message published to a group reaches each worker
once, and the worker then puts it in the queue of every member channel: per
delivered frame, msgpack decoding, a queue wake-up and one turn of Channels'
dispatch loop per socket (`await_many_dispatch`: an `asyncio.wait` and a new
task each time). At a few thousand deliveries a second that was most of a
worker's CPU (bench/PERFORMANCE.md). Here:

* a consumer may register an `offer(event) -> bool` for its channel
  (`register`). A group message is decoded once per worker and offered to
  each local member that registered; one that takes it (returns True) gets no
  queue entry. Every other member, and any event type an offer declines,
  goes through the channel queue exactly as before, so `group_send` from any
  code keeps working for any handler. The event dict is shared by every
  offer: an offer must not change it.
* `group_send`/`send` publish without the shard's lock. The library holds
  one asyncio lock per Redis shard around every PUBLISH, so a worker had one
  publish in flight at a time, each waiting for a turn of a busy event loop
  (a convoy: 10-100 ms per message under load). Here the publishes that
  come while one pipeline is in flight go together in the next one.

* a socket's own channel is process-local: `new_channel` names it
  `<inbox>!<id>` (Channels' form for process-local channels), where the inbox
  is one Redis channel per worker, subscribed once. `send` to such a name
  publishes to its inbox with the name in front of the payload, and the
  worker's receive loop puts it in that socket's queue. The library
  subscribed to a Redis channel per socket: a SUBSCRIBE when it opened and
  an UNSUBSCRIBE when it closed, each under the shard's lock, and their
  replies through the receive loop (~7 % of a worker's CPU under a churn of
  reconnects: bench/README.md "Worker CPU per reconnect").

Everything else (group subscriptions, reconnects and their resync hook,
Sentinel hosts, flush) is the library's. This module is the only place that subclasses
its internals; tests/integration/test_channel_layer.py pins what it relies on
(the library version is locked in requirements.txt).
"""
from __future__ import annotations

import asyncio
import contextvars
import logging
import uuid
from typing import Callable

from channels_redis.pubsub import RedisPubSubChannelLayer, RedisPubSubLoopLayer, RedisSingleShardConnection
from channels_redis.utils import _wrap_close

from app.lean_asyncio import LeanQueue

log = logging.getLogger(__name__)

Offer = Callable[[dict], bool]

# channel name -> offer. Channel names are unique (uuid4) across processes and
# event loops, so one dict per process is enough.
_offers: dict[str, Offer] = {}


def register(channel_name: str, offer: Offer) -> None:
    """Offer this channel's group messages to `offer` before its queue."""
    _offers[channel_name] = offer


def unregister(channel_name: str | None) -> None:
    _offers.pop(channel_name, None)


# PUBLISHes a worker sends in one pipeline (one write, one round trip). While
# a pipeline is in flight the next publishes wait and go together in the next:
# the batch follows the load, a lone publish goes at once. One connection per
# shard: redis-py's pool opens a connection per concurrent command and keeps
# it, and building one costs milliseconds of CPU (it reads package metadata).
MAX_PIPELINE = 500


class _Shard(RedisSingleShardConnection):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._outgoing: list = []
        self._flusher: asyncio.Task | None = None

    async def publish(self, channel, message):
        done = asyncio.get_running_loop().create_future()
        self._outgoing.append((channel, message, done))
        if self._flusher is None or self._flusher.done():
            # No context of the caller's: a consumer's context holds its thread-sensitive executor.
            self._flusher = asyncio.get_running_loop().create_task(self._flush(), context=contextvars.Context())
        await done

    async def _flush(self):
        while self._outgoing:
            batch, self._outgoing = self._outgoing[:MAX_PIPELINE], self._outgoing[MAX_PIPELINE:]
            try:
                self._ensure_redis()
                async with self._redis.pipeline(transaction=False) as pipe:
                    for channel, message, _ in batch:
                        pipe.publish(channel, message)
                    results = await pipe.execute(raise_on_error=False)
            except BaseException as exc:  # the connection failed: every publish of the batch did
                for _, _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
                if not isinstance(exc, Exception):  # cancelled: nobody waits forever
                    for _, _, done in self._outgoing:
                        done.cancel()
                    self._outgoing = []
                    raise
            else:
                for (_, _, done), result in zip(batch, results):
                    if not done.done():
                        if isinstance(result, Exception):
                            done.set_exception(result)
                        else:
                            done.set_result(result)

    def _receive_message(self, message):
        if message is None:
            return
        name = message["channel"]
        if isinstance(name, bytes):
            name = name.decode()
        layer = self.channel_layer  # the loop layer: its channels and groups
        if name == layer.inbox:
            # "<socket's channel>\n<payload>" (_LoopLayer.send); a socket gone meanwhile gets nothing.
            target, _, data = message["data"].partition(b"\n")
            queue = layer.channels.get(target.decode())
            if queue is not None:
                queue.put_nowait(data)
            return
        members = layer.groups.get(name)
        if members is None or name in layer.channels:
            return super()._receive_message(message)
        data, event = message["data"], None
        for channel_name in tuple(members):  # an offer may close a socket, and a close leaves the group
            queue = layer.channels.get(channel_name)
            if queue is None:
                continue
            offer = _offers.get(channel_name)
            if offer is not None:
                if event is None:
                    event = layer.channel_layer.deserialize(data)
                try:
                    if offer(event):
                        continue
                except Exception:  # a bug in one offer: not the others' loss, nor the receive loop's (it would pause 1 s)
                    log.exception("offer of %s failed; the message goes to its queue", channel_name)
            queue.put_nowait(data)


LOCAL_PREFIX = "specific."


class _LoopLayer(RedisPubSubLoopLayer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._shards = [_Shard(shard.host, self) for shard in self._shards]
        # This worker's (event loop's) one Redis channel for its sockets' own channels.
        self.inbox = f"{self.prefix}{LOCAL_PREFIX}{uuid.uuid4().hex}!"

    async def new_channel(self, prefix=LOCAL_PREFIX):
        if prefix != LOCAL_PREFIX:
            return await super().new_channel(prefix)
        channel = f"{self.inbox}{uuid.uuid4().hex}"
        self.channels[channel] = LeanQueue()  # an idle asyncio.Queue is ~3 KiB (app/lean_asyncio.py)
        shard = self._get_shard(self.inbox)
        if self.inbox not in shard._subscribed_to:  # once per worker, and again after a flush
            await shard.subscribe(self.inbox)
        return channel

    async def send(self, channel, message):
        inbox, local, _ = channel.partition("!")
        if not local:
            return await super().send(channel, message)
        inbox += "!"
        # A channel name never holds a newline (Channels' name rules), so the first one ends it.
        await self._get_shard(inbox).publish(inbox, channel.encode() + b"\n" + self.channel_layer.serialize(message))

    async def receive(self, channel):
        queue = self.channels.get(channel) if channel.startswith(self.inbox) else None
        if queue is None:
            return await super().receive(channel)
        try:
            message = await queue.get()
        except (asyncio.CancelledError, asyncio.TimeoutError, GeneratorExit):
            # The consumer is ending (the library's assumption too): the channel goes; no UNSUBSCRIBE to send.
            self.channels.pop(channel, None)
            raise
        return self.channel_layer.deserialize(message)

    async def _subscribe_to_channel(self, channel):
        # The library's (a channel of another prefix, or one first asked for by
        # receive()), with a LeanQueue for the channel's queue.
        self.channels[channel] = LeanQueue()
        await self._get_shard(channel).subscribe(channel)


class ChatPubSubChannelLayer(RedisPubSubChannelLayer):
    """settings.CHANNEL_LAYERS' backend for CHANNEL_LAYER=pubsub (the default)."""

    def _get_layer(self):
        loop = asyncio.get_running_loop()
        layer = self._layers.get(loop)
        if layer is None:
            layer = self._layers[loop] = _LoopLayer(*self._args, **self._kwargs, channel_layer=self)
            _wrap_close(self, loop)
        return layer
