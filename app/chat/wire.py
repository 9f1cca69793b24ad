"""A room message written straight to a socket's transport, framed once per worker.

Through ASGI, every delivered copy of a message costs the same work again:
Channels' `send` builds a message dict and awaits through each middleware's
`send`, then Uvicorn's `send` awaits its `writable` event, and websockets
frames the text (a Frame object, a struct, a bytes join) before the one
`transport.write` that is the only part a socket really needs. A server's
frames are not masked, and this runtime has no compression
(ws_per_message_deflate=False, app/uvicorn_worker.py), so the bytes of a
message's frame are the same for every socket: `text_frame` builds them once
and `Wire.write` hands them to each socket's transport.

This is the one place that knows Uvicorn's websocket protocol object (its
`transport`, `conn`, `writable` and close flags are attributes without an
underscore, but not an API). `attach` finds it behind the ASGI `send`
callable; any other server (Daphne in development, Channels' test
communicator) gets no wire and the regular ASGI path is used.
tests/unit/test_wire.py pins what this relies on against the installed
Uvicorn and websockets.
"""
from __future__ import annotations

import struct

from websockets.protocol import State

# app/ws_protocol.py's subclass of Uvicorn's websockets-sansio protocol, the
# protocol the worker asks for (ChatUvicornWorker.CONFIG_KWARGS["ws"]). Imported
# lazily: Daphne in development does not need Uvicorn.
_PROTOCOL_CLASS = None

SCOPE_KEY = "chat.wire"


def _protocol_class():
    global _PROTOCOL_CLASS
    if _PROTOCOL_CLASS is None:
        from app.ws_protocol import ChatWebSocketProtocol

        _PROTOCOL_CLASS = ChatWebSocketProtocol
    return _PROTOCOL_CLASS


class Wire:
    """Writes ready frames to one Uvicorn websocket connection."""

    __slots__ = ("_protocol",)

    def __init__(self, protocol):
        self._protocol = protocol

    def write(self, frame: bytes) -> bool:
        """Write `frame` now if the connection is open and its transport is not
        paused (flow control); False otherwise, and nothing was written: the
        caller takes the regular path, which waits for the transport or finds
        the connection closed."""
        p = self._protocol
        if (p.close_sent or p.disconnected or not p.handshake_complete or not p.writable.is_set()
                or p.conn.state is not State.OPEN or p.transport.is_closing()):
            return False
        p.transport.write(frame)
        return True


def attach(scope: dict, send) -> dict:
    """The scope, with a Wire for `send`'s connection when `send` is Uvicorn's
    own (the outermost middleware gets it unwrapped)."""
    protocol = getattr(send, "__self__", None)
    try:
        cls = _protocol_class()
    except ImportError:  # no Uvicorn: Daphne
        return scope
    if type(protocol) is not cls:
        return scope
    return dict(scope, **{SCOPE_KEY: Wire(protocol)})


# The last text framed and its frame: every local socket is offered the same
# event (app/chat/layer.py), so all but the first copy reuse the bytes.
_last: tuple[str | None, bytes] = (None, b"")


def text_frame(text: str) -> bytes:
    """A final, unmasked, uncompressed text frame (RFC 6455 section 5.2)."""
    global _last
    last_text, last_frame = _last
    if text is last_text:
        return last_frame
    payload = text.encode()
    size = len(payload)
    if size < 126:
        header = struct.pack("!BB", 0x81, size)
    elif size < 65536:
        header = struct.pack("!BBH", 0x81, 126, size)
    else:
        header = struct.pack("!BBQ", 0x81, 127, size)
    frame = header + payload
    _last = (text, frame)
    return frame
