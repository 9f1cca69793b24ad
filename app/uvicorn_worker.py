"""The Uvicorn worker class the runtime contract names in gunicorn.conf.py."""
import gc

from uvicorn_worker import UvicornWorker

# Seconds between Uvicorn giving up on the connections it is draining and
# gunicorn's master SIGKILLing the worker (graceful_timeout); half of it when
# graceful_timeout is shorter than 10 s.
DRAIN_MARGIN = 5


# Young-generation GC threshold (CPython's default: 700 allocations). Every
# socket and every message allocates; with the default the workers ran ~11
# young collections a second and a full one that held the event loop for
# ~110 ms of CPU (the p99 tail). Measured with gc.callbacks in a worker at
# 7,000 deliveries/s (bench/README.md "GC").
GC_YOUNG_THRESHOLD = 20000


def tune_gc() -> None:
    """Freeze what exists once the app is loaded (Django, the modules: never
    garbage) so no collection walks it again, and collect the young generation
    less often."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


def drain_seconds(graceful_timeout: int) -> int:
    """How long a worker waits for open connections after SIGTERM: inside
    gunicorn's graceful_timeout, so the worker ends by itself (cancelling what
    is stuck) instead of being killed with everything it holds."""
    return max(1, graceful_timeout - min(DRAIN_MARGIN, graceful_timeout // 2))


class ChatUvicornWorker(UvicornWorker):
    CONFIG_KWARGS = {
        **UvicornWorker.CONFIG_KWARGS,
        # Django's ASGI handler does not speak lifespan; "auto" would log a
        # failed startup probe on every boot.
        "lifespan": "off",
        # The httptools protocol ("auto" picks it), freed without the cyclic GC
        # after a websocket upgrade (app/http_protocol.py).
        "http": "app.http_protocol:ChatHttpProtocol",
        # The protocol "auto" picks when websockets is installed (websockets-sansio),
        # holding less per open socket (app/ws_protocol.py), named: the fan-out
        # writes frames to its connections directly (app/chat/wire.py).
        "ws": "app.ws_protocol:ChatWebSocketProtocol",
        # Pings keep idle sockets alive through proxies that cut silent ones
        # (Heroku's router: 55 s) and find dead peers.
        "ws_ping_interval": 20.0,
        "ws_ping_timeout": 20.0,
        # A chat frame is small; a huge one is refused by the protocol (1009)
        # before it costs memory.
        "ws_max_size": 64 * 1024,
        # No permessage-deflate: every socket would keep its own compressor
        # (~34 KiB) and compress each fanned-out copy separately (~20 us of
        # CPU per delivered frame); chat frames are a few hundred bytes.
        # README "Performance" has the numbers.
        "ws_per_message_deflate": False,
    }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # uvicorn-worker builds Uvicorn's Config without gunicorn's
        # graceful_timeout, so Uvicorn would wait for a stuck connection (a
        # request body that never arrives, a handler that never returns)
        # forever, until the master's SIGKILL. timeout_graceful_shutdown is a
        # public Config option: after it, Uvicorn cancels what is left and the
        # worker exits cleanly (tests/platforms/test_shutdown_windows.py).
        self.config.timeout_graceful_shutdown = drain_seconds(self.cfg.graceful_timeout)

    def run(self) -> None:
        tune_gc()  # the app is loaded by now (gunicorn's init_process: load_wsgi, then run)
        return super().run()
