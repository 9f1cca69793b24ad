"""A websocket's protocol objects are freed by reference counting, not left for the cyclic GC.

Two cycles per websocket, found in issue #13's churn soak (bench/README.md "Churn"):
Uvicorn's httptools protocol and its parser, which Uvicorn breaks for plain HTTP
but not after a websocket upgrade (app/http_protocol.py), and websockets'
ServerProtocol and its parser generator, which never finishes
(app/ws_protocol.py). Real parts: Uvicorn's server in this
event loop with the worker's own `http` and `ws` protocol settings, real
websocket and HTTP clients. The cyclic collector is off while the sockets come
and go, so what is still alive afterwards is what only a collection would free.
The same run with each library's own protocol is the control: it pins the library
behaviour each subclass exists for (when the library breaks the cycle itself,
that test fails and the override can go).
"""
import asyncio
import gc
import urllib.request

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from websockets.asyncio.client import connect
from websockets.server import ServerProtocol

from app.http_protocol import ChatHttpProtocol
from app.uvicorn_worker import ChatUvicornWorker

SOCKETS = 20


async def app(scope, receive, send):
    if scope["type"] == "http":
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"ok"})
        return
    assert (await receive())["type"] == "websocket.connect"
    await send({"type": "websocket.accept"})
    while (message := await receive())["type"] == "websocket.receive":
        await send({"type": "websocket.send", "text": "echo " + message["text"]})


WORKER = ChatUvicornWorker.CONFIG_KWARGS


async def serve(http, ws=WORKER["ws"]):
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off",
                                           http=http, ws=ws,
                                           ws_per_message_deflate=WORKER["ws_per_message_deflate"]))
    server.install_signal_handlers = lambda: None  # the test runner keeps its own
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    return server, task, server.servers[0].sockets[0].getsockname()[1]


def live(cls) -> int:
    return sum(issubclass(type(o), cls) for o in gc.get_objects())  # type(): no weakproxy lookups


async def until_every_connection_gone(server):
    for _ in range(500):
        if not server.server_state.connections:
            return
        await asyncio.sleep(0.01)


async def left_by_websockets(cls, http=WORKER["http"], ws=WORKER["ws"]) -> int:
    """Open, use and close SOCKETS websockets with the cyclic GC off; the `cls`
    objects still alive once every connection is gone."""
    server, task, port = await serve(http, ws)
    try:
        gc.collect()
        before = live(cls)
        gc.disable()
        for n in range(SOCKETS):
            async with connect(f"ws://127.0.0.1:{port}/ws/", compression=None) as sock:
                await sock.send(str(n))
                assert await sock.recv() == f"echo {n}"
        await until_every_connection_gone(server)
        await asyncio.sleep(0.05)
        return live(cls) - before
    finally:
        gc.enable()
        server.should_exit = True
        await asyncio.wait_for(task, 10)


def test_the_worker_serves_http_with_the_subclass():
    assert WORKER["http"] == "app.http_protocol:ChatHttpProtocol"
    assert issubclass(ChatHttpProtocol, HttpToolsProtocol)  # what "auto" picks with httptools installed


def test_the_worker_serves_websockets_with_the_subclass():
    assert WORKER["ws"] == "app.ws_protocol:ChatWebSocketProtocol"


async def test_a_websocket_leaves_no_http_protocol_for_the_cyclic_gc():
    assert await left_by_websockets(HttpToolsProtocol) == 0


async def test_control_uvicorns_own_http_protocol_leaves_one_per_websocket():
    assert await left_by_websockets(HttpToolsProtocol, http="httptools") == SOCKETS


async def test_a_websocket_leaves_no_websockets_protocol_for_the_cyclic_gc():
    assert await left_by_websockets(ServerProtocol) == 0


async def test_control_uvicorns_own_ws_protocol_leaves_one_per_websocket():
    assert await left_by_websockets(ServerProtocol, ws="websockets-sansio") == SOCKETS


async def test_plain_http_still_served_and_freed():
    server, task, port = await serve(WORKER["http"])
    try:
        gc.collect()
        before = live(HttpToolsProtocol)
        gc.disable()
        for _ in range(5):
            body = await asyncio.to_thread(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read())
            assert body == b"ok"
        await until_every_connection_gone(server)
        assert live(HttpToolsProtocol) == before
    finally:
        gc.enable()
        server.should_exit = True
        await asyncio.wait_for(task, 10)
