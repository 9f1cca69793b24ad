"""A blocking websocket client on websockets' asyncio client.

The verifier and the test harness want a simple blocking API (`with
endpoint.websocket(path) as ws: ws.send(...); ws.recv(timeout=5)`), from
several threads. websockets' *sync* client gives that, but it reads in a
background thread while the caller's thread writes, both on one
`ssl.SSLSocket`, i.e. one OpenSSL object, which OpenSSL does not support:
under TLS 1.3 (session tickets right after the handshake) a connect now and
then never sees its 101 answer and hangs.

Here every connection lives on one private event loop, in one daemon thread
started on first use: asyncio's TLS (a memory BIO driven by that one thread)
is the only code that touches OpenSSL. The blocking calls hand a coroutine to
that loop and wait for its result; timeouts are applied inside the loop, so
an expired `recv` is cancelled there (websockets documents cancelling `recv`
as safe: the next `recv` returns the next message).
"""
from __future__ import annotations

import asyncio
import threading
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as asyncio_connect
from websockets.exceptions import ConnectionClosedOK

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None


def _event_loop() -> asyncio.AbstractEventLoop:
    global _loop, _thread
    with _lock:
        if _loop is None:
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="ws-client-loop", daemon=True)
            thread.start()
            _loop, _thread = loop, thread
        return _loop


def _run(coro):
    """Run `coro` on the private loop and wait for its result (or exception)."""
    loop = _event_loop()
    if threading.current_thread() is _thread:
        coro.close()
        raise RuntimeError("blocking websocket call from the client's own event loop thread")
    return asyncio.run_coroutine_threadsafe(coro, loop).result()


class BlockingWebsocket:
    """The blocking methods the tests use, on one asyncio `ClientConnection`."""

    def __init__(self, connection: ClientConnection):
        self.connection = connection

    def send(self, message: str | bytes, text: bool | None = None) -> None:
        _run(self.connection.send(message, text=text))

    def recv(self, timeout: float | None = None) -> str | bytes:
        """The next message; TimeoutError after `timeout` seconds,
        ConnectionClosed once the connection is closed."""

        async def receive():
            async with asyncio.timeout(timeout):
                return await self.connection.recv()

        return _run(receive())

    def __iter__(self):
        while True:
            try:
                yield self.recv()
            except ConnectionClosedOK:
                return

    def close(self, code: int = 1000, reason: str = "") -> None:
        _run(self.connection.close(code, reason))

    @property
    def close_code(self) -> int | None:
        return self.connection.close_code

    @property
    def close_reason(self) -> str | None:
        return self.connection.close_reason

    @property
    def socket(self):
        """The connection's socket (for getsockname/getpeername)."""
        return self.connection.transport.get_extra_info("socket")

    @property
    def tls_version(self) -> str | None:
        ssl_object = self.connection.transport.get_extra_info("ssl_object")
        return ssl_object.version() if ssl_object is not None else None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def connect(uri: str, **kwargs: Any) -> BlockingWebsocket:
    """`websockets.asyncio.client.connect(uri, **kwargs)`, opened on the
    private loop. No proxy from the environment: tests talk to the address
    they name."""
    kwargs.setdefault("proxy", None)

    async def opening():
        return await asyncio_connect(uri, **kwargs)

    return BlockingWebsocket(_run(opening()))
