"""The Uvicorn worker class the runtime contract names in gunicorn.conf.py."""
from uvicorn_worker import UvicornWorker


class ChatUvicornWorker(UvicornWorker):
    CONFIG_KWARGS = {
        **UvicornWorker.CONFIG_KWARGS,
        # Django's ASGI handler does not speak lifespan; "auto" would log a
        # failed startup probe on every boot.
        "lifespan": "off",
        # Pings keep idle sockets alive through proxies that cut silent ones
        # (Heroku's router: 55 s) and find dead peers.
        "ws_ping_interval": 20.0,
        "ws_ping_timeout": 20.0,
        # A chat frame is small; a huge one is refused by the protocol (1009)
        # before it costs memory.
        "ws_max_size": 64 * 1024,
    }
