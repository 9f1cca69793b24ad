"""Liveness and readiness.

/healthz touches nothing: a busy database must not get the pod killed.
/readyz checks what serving a chat needs: a database query and a round trip
through the channel layer, each under a short timeout, and answers 503 with
the failing part named when either fails. Its result is computed at most
once a second per process (requests meanwhile share it, also one still in
flight), so a flood of /readyz is not a flood of database queries and Redis
round trips.
"""
import asyncio
import time
import uuid

from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from django.db import connection
from django.http import JsonResponse
from django.views.decorators.cache import never_cache

CHECK_TIMEOUT = 2.0
READY_CACHE_SECONDS = 1.0

_probe = {"channel": None, "lock": None}


@never_cache
def healthz(request):
    return JsonResponse({"status": "ok"})


def _query_database():
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()


async def _round_trip():
    """Send a nonce to this process's probe channel and read it back."""
    layer = get_channel_layer()
    if _probe["lock"] is None:
        _probe["lock"] = asyncio.Lock()
    async with _probe["lock"]:
        # One channel per process, reused: a new channel per probe would leave
        # a subscription behind on every call with the PubSub layer.
        if _probe["channel"] is None:
            _probe["channel"] = await layer.new_channel("readyz.")
        nonce = uuid.uuid4().hex
        try:
            await layer.send(_probe["channel"], {"type": "readyz", "nonce": nonce})
            while (await layer.receive(_probe["channel"])).get("nonce") != nonce:
                pass  # an answer to an earlier probe that timed out
        except BaseException:
            # A cancelled receive unsubscribes the channel: start afresh next time.
            _probe["channel"] = None
            raise


async def _check(coro_fn):
    try:
        await asyncio.wait_for(coro_fn(), CHECK_TIMEOUT)
        return "ok"
    except asyncio.TimeoutError:
        return "timeout"
    except Exception as exc:  # the name of the failure, not its details
        return f"error: {type(exc).__name__}"


_ready = {"at": 0.0, "result": None, "task": None}


async def _run_checks():
    database = await _check(sync_to_async(_query_database, thread_sensitive=True))
    channel_layer = await _check(_round_trip)
    _ready.update(at=time.monotonic(), result=(database, channel_layer))
    return database, channel_layer


async def _readiness():
    if _ready["result"] is not None and time.monotonic() - _ready["at"] < READY_CACHE_SECONDS:
        return _ready["result"]
    loop = asyncio.get_running_loop()
    task = _ready["task"]
    if task is None or task.done() or task.get_loop() is not loop:
        task = _ready["task"] = loop.create_task(_run_checks())
    return await asyncio.shield(task)


async def readyz(request):
    database, channel_layer = await _readiness()
    ok = database == "ok" and channel_layer == "ok"
    response = JsonResponse(
        {"status": "ok" if ok else "unavailable", "checks": {"database": database, "channel_layer": channel_layer}},
        status=200 if ok else 503,
    )
    response["Cache-Control"] = "no-store"
    return response
