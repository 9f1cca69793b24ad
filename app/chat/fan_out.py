"""group_send that survives the stale connection a Redis restart leaves behind.

channels_redis publishes on a pooled redis-py connection. After Redis
restarts, the first command on that connection fails ("Connection closed by
server", pinned in tests/integration/test_fan_out_retry.py) and the next one
connects afresh. Without a second attempt the first message sent through each
worker after a restart reached nobody live (and a revocation reached no other
worker). A copy published twice is sent once: each socket keeps what it was
sent (app/chat/delivery.py), and a second revocation closes nothing more.
"""
from __future__ import annotations

import logging

from app.chat.guard import OUTAGE_ERRORS

log = logging.getLogger(__name__)

ATTEMPTS = 2


async def fan_out(layer, group: str, event: dict, attempts: int = ATTEMPTS) -> None:
    """`layer.group_send(group, event)`, once more after an outage error."""
    for attempt in range(1, attempts + 1):
        try:
            await layer.group_send(group, event)
            return
        except OUTAGE_ERRORS as exc:
            if attempt == attempts:
                raise
            log.info("group_send to %s retried (%s: %s)", group, type(exc).__name__, exc)
