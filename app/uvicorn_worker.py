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
        # No permessage-deflate: every socket would keep its own compressor
        # (~34 KiB) and compress each fanned-out copy separately (~20 us of
        # CPU per delivered frame); chat frames are a few hundred bytes.
        # README "Performance" has the numbers.
        "ws_per_message_deflate": False,
    }
