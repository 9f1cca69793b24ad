"""Uvicorn's httptools protocol, freed by reference counting after a websocket upgrade.

Every websocket starts as an HTTP request on this protocol. The httptools
parser holds the protocol's callbacks (bound methods), and the protocol holds
the parser: a reference cycle. Uvicorn breaks it in `connection_lost` for
plain HTTP, but not in `handle_websocket_upgrade`, after which this object is
never called again. So each websocket left ~30 objects behind (the protocol,
its parser, flow control, the request's header tuples and the transport) for
the cyclic garbage collector. The workers collect the young generation
rarely and the oldest one about every ten minutes under churn
(app/uvicorn_worker.py), so this garbage piled up between full collections
and the workers' RSS climbed through the churn soak (bench/README.md "Churn":
found with gc.DEBUG_SAVEALL in a worker at 200 reconnects/s: ~100 such
cycles a second per worker; app/ws_protocol.py has the other one).

The subclass (app/uvicorn_worker.py: `http`) drops the parser once the
websocket protocol has taken the transport, as `connection_lost` does.
tests/unit/test_protocols_freed.py pins it against a real Uvicorn.
"""
from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class ChatHttpProtocol(HttpToolsProtocol):
    def handle_websocket_upgrade(self) -> None:
        super().handle_websocket_upgrade()
        # The transport now calls the websocket protocol; nothing reads the parser
        # (or this request's state) again.
        self.parser = None
        self.headers = self.scope = None
