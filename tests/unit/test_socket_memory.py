"""What one open websocket keeps in a worker (issue #13: at most 32 KiB per busy socket).

bench/README.md "Memory per socket" has the measurements; these pin the
changes: Uvicorn's protocol (app/ws_protocol.py) with lean queue and event and
without the handshake's request/response once it is answered; the channel
layer's lean per-channel queue (app/chat/layer.py); the scope's header list
emptied once the chat consumer is accepted (app/chat/consumers.py)."""
import asyncio
import gc
import tracemalloc

import pytest
from uvicorn.config import Config
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState

from app import uvicorn_worker
from app.lean_asyncio import LeanEvent, LeanQueue
from app.ws_protocol import ChatWebSocketProtocol

# What a browser sends (Chromium's header set; values of typical length).
HANDSHAKE = (b"GET /ws/rooms/1/?after=12 HTTP/1.1\r\nHost: chat.example.com\r\nConnection: Upgrade\r\n"
             b"Pragma: no-cache\r\nCache-Control: no-cache\r\nUser-Agent: " + b"u" * 110 + b"\r\n"
             b"Upgrade: websocket\r\nOrigin: https://chat.example.com\r\nSec-WebSocket-Version: 13\r\n"
             b"Accept-Encoding: gzip, deflate, br, zstd\r\nAccept-Language: en-GB,en;q=0.9,fr;q=0.8\r\n"
             b"Cookie: csrftoken=" + b"c" * 32 + b"; sessionid=" + b"s" * 32 + b"\r\n"
             b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
             b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n")


class Transport(asyncio.Transport):
    def __init__(self):
        super().__init__()
        self.written, self.closed = [], False

    def write(self, data):
        self.written.append(bytes(data))

    def close(self):
        self.closed = True

    def is_closing(self):
        return self.closed

    def get_extra_info(self, name, default=None):
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 40000)}.get(name, default)

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass


def served_protocol(app, protocol_class=None):
    config = Config(app=app, ws=protocol_class or uvicorn_worker.ChatUvicornWorker.CONFIG_KWARGS["ws"],
                    lifespan="off", ws_ping_interval=None, ws_per_message_deflate=False)
    config.load()
    protocol = config.ws_protocol_class(config=config, server_state=ServerState(), app_state={})
    protocol.connection_made(Transport())
    return protocol


def test_the_workers_serve_websockets_with_the_lean_protocol():
    config = Config(app=lambda *a: None, ws=uvicorn_worker.ChatUvicornWorker.CONFIG_KWARGS["ws"], lifespan="off")
    config.load()
    assert config.ws_protocol_class is ChatWebSocketProtocol


async def test_an_accepted_socket_keeps_no_handshake_request_or_response_and_no_asyncio_queue():
    seen = {}

    async def app(scope, receive, send):
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        seen["headers"] = scope["headers"]
        seen["message"] = await receive()
        await send({"type": "websocket.send", "text": "pong"})
        await send({"type": "websocket.close", "code": 1000})

    protocol = served_protocol(app)
    protocol.data_received(HANDSHAKE)
    for _ in range(20):
        await asyncio.sleep(0)
    assert protocol.transport.written and protocol.transport.written[0].startswith(b"HTTP/1.1 101")
    assert protocol.request is None and protocol.response is None
    # websockets' parser generator still holds the Request (a local of its frame): emptied.
    assert not protocol.conn.parser.gi_frame.f_locals["request"].headers
    assert any(key.lower() == b"cookie" for key, _ in seen["headers"])  # the app still gets the headers
    assert isinstance(protocol.queue, LeanQueue) and isinstance(protocol.writable, LeanEvent)
    # The socket still works both ways after that.
    protocol.data_received(b"\x81\x84abcd" + bytes(c ^ k for c, k in zip(b"ping", b"abcdabcd")))
    for _ in range(20):
        await asyncio.sleep(0)
    assert seen["message"] == {"type": "websocket.receive", "text": "ping"}
    assert protocol.transport.written[1] == b"\x81\x04pong"


async def test_a_refused_handshake_still_gets_its_403():
    async def app(scope, receive, send):
        await receive()
        await send({"type": "websocket.close"})

    protocol = served_protocol(app)
    protocol.data_received(HANDSHAKE)
    for _ in range(20):
        await asyncio.sleep(0)
    assert protocol.transport.written[0].startswith(b"HTTP/1.1 403")
    assert protocol.request is None and protocol.response is None


async def held_per_socket(protocol_class, sockets=100) -> float:
    """Bytes still allocated per accepted socket (protocol, scope, the app's
    task parked in receive) once every handshake is answered."""
    async def app(scope, receive, send):
        await receive()
        await send({"type": "websocket.accept"})
        await receive()

    for warm_up in (True, False):  # the first sockets also fill caches (codecs, Config, websockets' module state)
        if not warm_up:
            tracemalloc.start()
        protocols = [served_protocol(app, protocol_class) for _ in range(sockets)]
        for protocol in protocols:
            protocol.data_received(HANDSHAKE)
        for _ in range(20):
            await asyncio.sleep(0)
        assert all(p.transport.written[0].startswith(b"HTTP/1.1 101") for p in protocols)
        if not warm_up:
            gc.collect()
            held = tracemalloc.get_traced_memory()[0]
            tracemalloc.stop()
        for protocol in protocols:
            protocol.connection_lost(None)
        for _ in range(20):
            await asyncio.sleep(0)
    return held / sockets


async def test_an_open_socket_costs_uvicorn_at_least_6_kib_less_than_with_the_stock_protocol():
    """The queue and the event (~3.9 KiB) and the handshake's request and response (~3 KiB)."""
    stock = await held_per_socket(WebSocketsSansIOProtocol)
    lean = await held_per_socket(ChatWebSocketProtocol)
    assert stock - lean >= 6 * 1024, (stock, lean)


async def test_lean_queue_behaves_like_an_unbounded_asyncio_queue():
    q = LeanQueue()
    assert q.empty() and q.qsize() == 0 and not q.full()
    with pytest.raises(asyncio.QueueEmpty):
        q.get_nowait()
    q.put_nowait(1)
    await q.put(2)
    assert q.qsize() == 2 and [await q.get(), q.get_nowait()] == [1, 2] and q.empty()
    getter = asyncio.ensure_future(q.get())
    await asyncio.sleep(0)
    q.put_nowait(3)
    assert await getter == 3
    # A getter cancelled after it was woken passes the item on to the next one.
    first, second = asyncio.ensure_future(q.get()), asyncio.ensure_future(q.get())
    await asyncio.sleep(0)
    q.put_nowait(4)
    first.cancel()
    assert await second == 4 and first.cancelled()
    assert q._items is None and q._getters is None  # nothing left allocated when idle


async def test_a_lean_queue_with_its_reader_waiting_holds_under_400_bytes():
    """The usual state of a socket's queues: empty, one reader waiting (an
    asyncio.Queue: ~3.3 KiB; a deque for the waiters alone: ~0.6 KiB)."""
    queues = [LeanQueue() for _ in range(100)]
    tracemalloc.start()
    try:
        readers = [asyncio.ensure_future(q.get()) for q in queues]
        await asyncio.sleep(0)
        held = sum(stat.size for stat in tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(True, "*app/lean_asyncio.py")]).statistics("filename"))
    finally:
        tracemalloc.stop()
    for q, reader in zip(queues, readers):
        q.put_nowait(1)
        assert await reader == 1
    assert held / len(queues) < 400, held / len(queues)


async def test_lean_event_behaves_like_asyncio_event():
    e = LeanEvent()
    assert not e.is_set()
    waiters = [asyncio.ensure_future(e.wait()) for _ in range(2)]
    await asyncio.sleep(0)
    assert not any(w.done() for w in waiters)
    e.set()
    assert await asyncio.gather(*waiters) == [True, True] and e.is_set()
    assert await e.wait() is True
    e.clear()
    cancelled = asyncio.ensure_future(e.wait())
    await asyncio.sleep(0)
    cancelled.cancel()
    await asyncio.sleep(0)
    assert e._waiters is None and not e.is_set()


async def test_the_channel_layer_queues_each_channel_in_a_lean_queue(monkeypatch):
    from app.chat.layer import ChatPubSubChannelLayer, _Shard

    async def subscribed(self, channel):  # no Redis here: the subscription itself is the library's
        subscribed.names.append(channel)
    subscribed.names = []
    monkeypatch.setattr(_Shard, "subscribe", subscribed)
    layer = ChatPubSubChannelLayer(hosts=[{"address": "redis://127.0.0.1:1"}])
    channel = await layer.new_channel()
    inbox = layer._get_layer().inbox  # the worker's one subscription for its sockets' channels
    assert subscribed.names == [inbox] and channel.startswith(inbox)
    queue = layer._get_layer().channels[channel]
    assert isinstance(queue, LeanQueue)
    queue.put_nowait(layer.serialize({"type": "chat.ping"}))
    assert await asyncio.wait_for(layer.receive(channel), 1) == {"type": "chat.ping"}


@pytest.mark.django_db(transaction=True)
async def test_the_chat_consumer_empties_the_scopes_header_list_once_accepted():
    from tests.unit.test_consumer import communicator, make_user_and_room

    alice, room = await make_user_and_room("alice")
    comm = communicator(room.pk, alice)
    headers = comm.scope["headers"]
    assert headers  # Host and Origin: the middleware read them at the handshake
    assert (await comm.connect())[0]
    assert headers == [] and comm.scope["headers"] is headers  # one list, shared by every copy of the scope
    await comm.send_to(text_data='{"message": "still works"}')
    assert "still works" in await comm.receive_from()
    await comm.disconnect()
