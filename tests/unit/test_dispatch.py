"""app/chat/dispatch.py: Channels' consumer loop with one task per socket fewer.

Pins the saving (tasks per open socket, positive control: Channels' own loop)
and Channels' contract: both sources dispatched, one handler at a time, a
handler's exception or StopConsumer ends the consumer whichever source it
came from, the channel is dropped from the layer at the end."""
import asyncio

import pytest
from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncWebsocketConsumer
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator

from app.chat.dispatch import LeanDispatch
from tests.unit.test_consumer import communicator, make_user_and_room

pytestmark = pytest.mark.django_db(transaction=True)  # Channels' dispatch closes stale database connections


class Probe(AsyncWebsocketConsumer):
    """Records what ran; `slow` handlers overlap if dispatch lets them."""

    log: list = []
    running = 0

    async def connect(self):
        await self.accept()
        await self.channel_layer.group_add("probe", self.channel_name)
        type(self).last_channel = self.channel_name

    async def _run(self, what, seconds=0.05):
        Probe.running += 1
        try:
            assert Probe.running == 1, "two handlers at once"
            self.log.append(("start", what))
            await asyncio.sleep(seconds)
            self.log.append(("end", what))
        finally:
            Probe.running -= 1

    async def receive(self, text_data=None, bytes_data=None):
        await self._run(text_data)
        await self.send(text_data=f"ws:{text_data}")

    async def probe_event(self, event):
        await self._run(event["n"])
        await self.send(text_data=f"layer:{event['n']}")

    async def probe_fail(self, event):
        raise RuntimeError("handler bug")

    async def probe_stop(self, event):
        raise StopConsumer()


class LeanProbe(LeanDispatch, Probe):
    pass


@pytest.fixture(autouse=True)
def fresh_log():
    Probe.log, Probe.running = [], 0


async def tasks_per_socket(app_factory, sockets=5) -> float:
    first = app_factory()  # starts the process-wide tasks (revocation listener, resync, ...)
    assert (await first.connect())[0]
    await asyncio.sleep(0.05)
    before = len(asyncio.all_tasks())
    comms = [app_factory() for _ in range(sockets)]
    for comm in comms:
        assert (await comm.connect())[0]
    await asyncio.sleep(0.05)
    held = len(asyncio.all_tasks()) - before
    for comm in [first, *comms]:
        await comm.disconnect()
    return held / sockets


async def test_an_open_chat_socket_runs_two_tasks_where_channels_runs_three():
    alice, room = await make_user_and_room("alice")
    assert await tasks_per_socket(lambda: communicator(room.pk, alice)) == 2  # the consumer's and the channel reader

    class Stock(AsyncWebsocketConsumer):  # positive control: Channels' await_many_dispatch
        async def connect(self):
            await self.accept()
    assert await tasks_per_socket(lambda: WebsocketCommunicator(Stock.as_asgi(), "/ws/")) == 3


async def test_both_sources_are_dispatched_one_handler_at_a_time_each_in_order():
    comm = WebsocketCommunicator(LeanProbe.as_asgi(), "/ws/")
    assert (await comm.connect())[0]
    layer = get_channel_layer()
    for n in range(3):
        await comm.send_to(text_data=f"w{n}")
        await layer.group_send("probe", {"type": "probe.event", "n": f"l{n}"})
    frames = [await comm.receive_from(timeout=2) for _ in range(6)]
    assert [f for f in frames if f.startswith("ws:")] == ["ws:w0", "ws:w1", "ws:w2"]
    assert [f for f in frames if f.startswith("layer:")] == ["layer:l0", "layer:l1", "layer:l2"]
    starts = [what for kind, what in Probe.log if kind == "start"]
    assert Probe.log == [step for what in starts for step in (("start", what), ("end", what))]  # never interleaved
    await comm.disconnect()


async def test_a_channel_handler_that_raises_ends_the_consumer_with_its_exception():
    comm = WebsocketCommunicator(LeanProbe.as_asgi(), "/ws/")
    assert (await comm.connect())[0]
    await get_channel_layer().group_send("probe", {"type": "probe.fail"})
    with pytest.raises(RuntimeError, match="handler bug"):  # by itself: nothing cancels it here
        await asyncio.wait_for(asyncio.shield(comm.future), 2)


async def test_stop_consumer_from_a_channel_handler_ends_the_consumer_cleanly():
    comm = WebsocketCommunicator(LeanProbe.as_asgi(), "/ws/")
    assert (await comm.connect())[0]
    layer = get_channel_layer()
    await layer.group_send("probe", {"type": "probe.stop"})
    assert await asyncio.wait_for(asyncio.shield(comm.future), 2) is None  # returned by itself, no exception


async def test_a_direct_channel_send_reaches_the_handler_and_the_channel_is_dropped_at_the_end():
    comm = WebsocketCommunicator(LeanProbe.as_asgi(), "/ws/")
    assert (await comm.connect())[0]
    layer = get_channel_layer()
    channel = LeanProbe.last_channel
    await layer.send(channel, {"type": "probe.event", "n": "direct"})
    assert await comm.receive_from(timeout=2) == "layer:direct"
    await comm.disconnect()
    assert channel not in layer.channels  # the reader's cancelled receive dropped it, as with Channels' loop


async def test_a_channel_read_that_fails_during_a_handler_ends_the_consumer_once_the_handler_is_done(monkeypatch):
    layer = get_channel_layer()

    async def failing_receive(channel):
        while not Probe.running:
            await asyncio.sleep(0.005)
        raise RuntimeError("layer down")

    monkeypatch.setattr(layer, "receive", failing_receive)
    comm = WebsocketCommunicator(LeanProbe.as_asgi(), "/ws/")
    assert (await comm.connect())[0]
    await comm.send_to(text_data="w0")
    with pytest.raises(RuntimeError, match="layer down"):
        await asyncio.wait_for(asyncio.shield(comm.future), 2)
    assert ("end", "w0") in Probe.log  # the handler was not cut short
