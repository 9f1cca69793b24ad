"""Health answers that do not depend on the Host header, and a start-up check.

Platform checkers call an instance on its private address: Fly's checks and
the kubelet send that address (e.g. "172.19.17.130:8000") as Host, Render
sends a custom domain once one is verified, Docker's HEALTHCHECK and Ansible
call 127.0.0.1. Django refuses every Host outside ALLOWED_HOSTS with 400, so
a check that depends on a Host override fails the deploy the day the
platform ignores the override ("no known healthy instances").

`HealthCheckMiddleware` is the first middleware: for GET/HEAD on the health
paths it calls the view that app/urls.py maps the path to, before any
middleware asks for `request.get_host()`. Every other path and method goes
through the normal chain and still gets 400 for an unknown Host.

The three answers (README "Health checks"):
- /healthz: the process answers. Liveness; touches nothing.
- /readyz: database and channel layer now (app/health.py). Where a deploy or
  a rollout waits for it, a new instance that cannot reach them never
  replaces a working one. Never for routing or restarts: a blip of the
  shared PostgreSQL or Redis would fail every instance at once.
- /startupz: /readyz until it has passed once in this instance, then like
  /healthz. For platforms that use one check for the deploy *and* for routing
  and restarts (Render's healthCheckPath, a Kubernetes readinessProbe, Fly's
  service checks): a new instance must reach its dependencies before it
  takes traffic, and a later outage does not pull every instance out of
  rotation or get it restarted. During an outage the app answers users
  itself (a 503 page, websocket error frames, close 1013).
"""
from __future__ import annotations

import mmap

from asgiref.sync import async_to_sync, iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.http import JsonResponse
from django.urls import resolve

HEALTH_PATHS = frozenset({"/healthz", "/readyz", "/startupz"})
METHODS = frozenset({"GET", "HEAD"})

# "This instance has been ready once": one byte shared by all gunicorn workers
# of the instance. gunicorn.conf.py imports this module in the master before
# the workers fork, so every worker (also one respawned later) inherits the
# same MAP_SHARED page; a new instance (a new master) starts at 0. Imported
# only in a worker (runserver, tests) it is simply per process.
_STARTED = mmap.mmap(-1, 1)


def started() -> bool:
    return _STARTED[0] == 1


def mark_started() -> None:
    _STARTED[0] = 1


def _view(path: str):
    return resolve(path).func


class HealthCheckMiddleware:
    """Answer the health paths before anything validates the Host header."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response):
        self.get_response = get_response
        self.async_mode = iscoroutinefunction(get_response)
        if self.async_mode:
            markcoroutinefunction(self)

    @staticmethod
    def _is_health(request) -> bool:
        return request.path_info in HEALTH_PATHS and request.method in METHODS

    def __call__(self, request):
        if self.async_mode:
            return self.__acall__(request)
        if self._is_health(request):
            view = _view(request.path_info)
            return async_to_sync(view)(request) if iscoroutinefunction(view) else view(request)
        return self.get_response(request)

    async def __acall__(self, request):
        if self._is_health(request):
            view = _view(request.path_info)
            if iscoroutinefunction(view):
                return await view(request)
            return await sync_to_async(view, thread_sensitive=True)(request)
        return await self.get_response(request)


async def startupz(request):
    """/readyz until it passed once in this instance, then a cheap 200."""
    if not started():
        view = _view("/readyz")
        response = await view(request) if iscoroutinefunction(view) else await sync_to_async(view)(request)
        if response.status_code != 200:
            return response
        mark_started()
    response = JsonResponse({"status": "ok", "started": True,
                             "checks": "dependencies reached once since start; /readyz checks them now"})
    response["Cache-Control"] = "no-store"
    return response
