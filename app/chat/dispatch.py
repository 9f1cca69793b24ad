"""Channels' consumer loop with one task per socket fewer and no asyncio.wait.

Channels' AsyncConsumer.__call__ runs `await_many_dispatch([receive,
channel_receive], dispatch)`: a task per source, and `asyncio.wait` on both
for every message (its coroutines, a set, a waiter future and a callback per
task), then a new task for the source that fired. An idle socket held three
tasks and ~4 KiB in that machinery (tracemalloc in a worker holding 1,000
sockets; bench/README.md "Memory per socket").

`LeanDispatch.__call__` keeps Channels' contract and does the same setup (the
channel layer, `channel_name`, `channel_receive`, `base_send`):

* the consumer's own task reads the websocket (`receive`) and dispatches;
* one task reads the channel layer (`channel_receive`) and dispatches;
* a lock keeps Channels' guarantee that one handler runs at a time, each
  source in order; like Channels, each source has at most one message read
  and not yet handled;
* a handler that raises (StopConsumer included) ends the consumer as it does
  in Channels, whichever source it came from: the exception leaves __call__
  (StopConsumer: a clean return), and the channel reader is cancelled and
  awaited (the layer drops the channel).

A consumer without a channel layer gets Channels' own loop.
"""
from __future__ import annotations

import asyncio
import functools

from channels.exceptions import StopConsumer
from channels.layers import get_channel_layer


class LeanDispatch:
    """Mixin for an AsyncConsumer: listed before Channels' consumer class."""

    async def __call__(self, scope, receive, send):
        layer = get_channel_layer(self.channel_layer_alias)
        if layer is None:
            return await super().__call__(scope, receive, send)
        self.scope = scope
        self.channel_layer = layer
        self.channel_name = await layer.new_channel()
        self.channel_receive = functools.partial(layer.receive, self.channel_name)
        self.base_send = send
        state = _Turns(asyncio.current_task())
        reader = asyncio.get_running_loop().create_task(self._read_channel(state))
        try:
            while True:
                message = await receive()
                async with state.lock:
                    await self.dispatch(message)
                if state.failure is not None:  # the reader failed while this handler ran
                    raise state.failure
        except asyncio.CancelledError:
            if state.failure is None:
                raise  # cancelled from outside (the server shutting down)
            state.consumer.uncancel()
            if not isinstance(state.failure, StopConsumer):
                raise state.failure from None
        except StopConsumer:
            pass
        finally:
            reader.cancel()
            try:
                await reader
            except asyncio.CancelledError:
                pass

    async def _read_channel(self, state: _Turns) -> None:
        try:
            while True:
                message = await self.channel_receive()
                async with state.lock:
                    await self.dispatch(message)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: B036 - StopConsumer and bugs alike end the consumer, as in Channels
            state.failure = exc
            if not state.lock.locked():
                state.consumer.cancel()  # wakes the consumer's task out of `receive`, which raises `exc`
            # else the consumer's task is in a handler (the channel read itself failed): it raises `exc` after it


class _Turns:
    __slots__ = ("lock", "failure", "consumer")

    def __init__(self, consumer: asyncio.Task):
        self.lock = asyncio.Lock()
        self.failure: BaseException | None = None
        self.consumer = consumer
