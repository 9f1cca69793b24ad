"""The outermost ASGI layer: /metrics for scrapers, log ids for everything else.

Two ways in, both answered here, before Django looks at the Host header (a
scraper calls an instance by its private address, as the health checks do:
app/probes.py) and before any redirect to HTTPS:

* the app port (PORT): `GET /metrics` with `Authorization: Bearer
  <METRICS_TOKEN>` (compared in constant time). Any other request for
  /metrics, or any request at all when METRICS_TOKEN is unset, goes on to
  Django unchanged and gets exactly what an unknown path gets (404; or the
  400 of a bad Host, the 301 to HTTPS), so the endpoint cannot be told
  from a path that does not exist.
* METRICS_PORT, when set (gunicorn.conf.py binds it beside the app port, on
  METRICS_ADDRESS): `GET /metrics` without a token, for scrapers on a
  private network that send none (Fly's [metrics]). Nothing else is served
  there: other paths 404, websockets are refused.

The exposition sums every worker's values (app/observability/metrics.py).
"""
from __future__ import annotations

import asyncio
import hmac

from django.conf import settings

from app.observability import logs, metrics

PATH = "/metrics"
METHODS = ("GET", "HEAD")
NOT_FOUND = b"Not Found\n"


def _header(scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers") or ():
        if key == name:
            return value
    return None


def bearer_matches(scope, token: bytes | None) -> bool:
    """`Authorization: Bearer <token>` (scheme case-insensitive), compared in constant time."""
    if not token:
        return False
    value = _header(scope, b"authorization")
    if value is None:
        return False
    scheme, _, credentials = value.strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return False
    return hmac.compare_digest(credentials.strip(), token)


def server_port(scope) -> int | None:
    server = scope.get("server")
    return server[1] if server and len(server) > 1 else None


async def _answer(send, status: int, body: bytes, content_type: bytes, head: bool = False):
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode()),
                            (b"cache-control", b"no-store")]})
    await send({"type": "http.response.body", "body": b"" if head else body})


async def serve_metrics(scope, send):
    metrics.flush()  # this worker's pending counts first (on the event loop, where they are counted)
    accept = _header(scope, b"accept")
    body, content_type = await asyncio.to_thread(metrics.render, accept.decode("latin-1") if accept else None)
    await _answer(send, 200, body, content_type.encode(), head=scope["method"] == "HEAD")


class Observability:
    def __init__(self, app):
        self.app = app
        self.token = settings.METRICS_TOKEN.encode() if settings.METRICS_TOKEN else None
        self.metrics_port = settings.METRICS_PORT or None

    async def __call__(self, scope, receive, send):
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        metrics.ensure_ticker()
        tokens = logs.bind(scope)
        try:
            if self.metrics_port is not None and server_port(scope) == self.metrics_port:
                return await self.private_port(scope, receive, send)
            if (kind == "http" and scope["path"] == PATH and scope["method"] in METHODS
                    and bearer_matches(scope, self.token)):
                return await serve_metrics(scope, send)
            return await self.app(scope, receive, send)
        finally:
            logs.unbind(tokens)

    async def private_port(self, scope, receive, send):
        """METRICS_PORT: /metrics to anybody who reaches the port; nothing else."""
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})  # before accept: HTTP 403
            return
        if scope["path"] == PATH and scope["method"] in METHODS:
            return await serve_metrics(scope, send)
        await _answer(send, 404, NOT_FOUND, b"text/plain; charset=utf-8", head=scope["method"] == "HEAD")
