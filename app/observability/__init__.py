"""What an operator sees: Prometheus metrics and machine-readable logs.

- `metrics`: the counters, gauges and the delivery histogram, and the hooks
  the chat calls (one line each in guard.py, consumers.py, writer.py,
  resync.py, throttle.py). Correct across gunicorn's worker processes through
  prometheus_client's multiprocess mode (`multiproc`, wired in gunicorn.conf.py).
- `endpoint`: the outermost ASGI layer. Answers /metrics on the app port to a
  request with `Authorization: Bearer $METRICS_TOKEN` (anything else falls
  through to Django: 404, exactly like an unknown path) and, on METRICS_PORT,
  to anybody (a private port for scrapers that send no token); both before
  any Host validation. It also gives every request and websocket an id for
  the logs.
- `logs`: LOG_FORMAT=json, one JSON object per line for Django, gunicorn's
  and Uvicorn's logs and the chat, with the request or connection id, the
  user id where known and the worker pid.

README "Observability" says how each target scrapes.
"""
