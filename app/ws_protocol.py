"""Uvicorn's websockets-sansio protocol, holding less per open socket.

The workers serve websockets with Uvicorn's WebSocketsSansIOProtocol (what
`ws="auto"` picks); this subclass (app/uvicorn_worker.py: `ws`) changes only
what each open socket keeps, measured with tracemalloc in a worker holding
1,000 sockets (bench/README.md "Memory per socket"):

* the receive queue and the `writable` event are app/lean_asyncio.py's
  (~3.9 KiB per socket less: asyncio.Queue and Event build their deques up front);
* the handshake's parsed request and the prepared response (websockets'
  Request and Response, their Headers) are dropped once the handshake is
  done (~4 KiB): Uvicorn reads them only to answer the handshake. The ASGI
  scope keeps its own copy of the request headers. websockets' parser keeps
  the Request itself (a local of its generator), so its Headers are emptied.

And one thing it frees earlier: websockets' ServerProtocol keeps its parser, a
generator whose frame holds the ServerProtocol (`self.parser = self.parse()`),
and that generator never finishes (it waits at its last `yield` after the
close), so every websocket left a ServerProtocol, its StreamReader, close
frame, id and buffers as a reference cycle for the cyclic GC. Under churn
the workers' RSS climbed with it (bench/README.md "Churn": ~1,200 such
cycles per 30 s per worker at 200 reconnects/s, left between full
collections). `connection_lost` closes that generator, which clears its frame
and breaks the cycle: nothing steps the parser once the transport is gone.
tests/unit/test_protocols_freed.py pins it against a real Uvicorn and
websockets.
"""
from __future__ import annotations

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from app.lean_asyncio import LeanEvent, LeanQueue


class ChatWebSocketProtocol(WebSocketsSansIOProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.queue = LeanQueue()
        self.writable = LeanEvent()
        self.writable.set()
        self.request = self.response = None  # set by handle_connect

    def connection_lost(self, exc):
        super().connection_lost(exc)
        # The transport is gone: no more data or EOF reaches the parser, and a
        # later send() raises ClientDisconnected before it touches `conn`.
        self.conn.parser.close()

    async def send(self, message):
        await super().send(message)
        if self.response is not None and self.handshake_complete:
            # The handshake is answered: neither is read again. websockets' parser
            # (a generator) keeps the Request in its frame for the socket's life,
            # so its headers are emptied too.
            self.request.headers.clear()
            self.request = self.response = None
