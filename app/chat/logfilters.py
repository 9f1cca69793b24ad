"""Log filters: one line per client or backend fault, never a traceback.

A production log that fills with tracebacks for things that are not bugs
(a client sending invalid UTF-8, Redis being restarted) hides the real ones;
the fault suite fails on any "Traceback" in the gunicorn log.
"""
from __future__ import annotations

import asyncio
import logging
import time


class QuietRedisOutage(logging.Filter):
    """channels_redis logs a full traceback every second while Redis is down
    ("Unexpected exception in receive task"): keep one line, at most every 5 s."""

    def __init__(self):
        super().__init__()
        self._last = 0.0

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None:
            return True
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        if not isinstance(exc, (RedisConnectionError, RedisTimeoutError, OSError, asyncio.TimeoutError)):
            return True
        now = time.monotonic()
        if now - self._last < 5:
            return False
        self._last = now
        text = record.getMessage()
        record.msg, record.args = "%s (%s: %s); retrying", (text, type(exc).__name__, exc)
        record.exc_info = None
        record.exc_text = None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


class QuietClientFault(logging.Filter):
    """uvicorn logs a traceback when a client sends a text frame that is not
    UTF-8 (it then closes with 1007, which is right): keep one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, UnicodeDecodeError):
            record.msg, record.args = "%s (closing with 1007)", (record.getMessage(),)
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


class OneLine(logging.Filter):
    """Django logs every request with a Host outside ALLOWED_HOSTS at ERROR with a
    full traceback (django.security.DisallowedHost): anyone can fill the log
    with them. The 400 answer stays; the log keeps one WARNING line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info:
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def install() -> None:
    for name, kind in (("channels_redis.pubsub", QuietRedisOutage), ("uvicorn.error", QuietClientFault),
                       ("django.security.DisallowedHost", OneLine)):
        logger = logging.getLogger(name)
        if not any(isinstance(f, kind) for f in logger.filters):
            logger.addFilter(kind())
