"""Health paths answer whatever the Host; every other path still refuses an
unknown Host (app/probes.py). In-process through Django's handlers, sync
(test client) and async (ASGI, as gunicorn's Uvicorn workers run it)."""
from __future__ import annotations

import asyncio
import json

import pytest
from django.conf import settings

from app import probes

pytestmark = pytest.mark.django_db

CHECKER_HOSTS = ["172.19.17.130:8000", "10.0.3.7", "[fd00::5]:8000", "chat-web", "evil.example"]


@pytest.fixture(autouse=True)
def fresh_start_flag():
    probes._STARTED[0] = 0
    yield
    probes._STARTED[0] = 0


def test_the_middleware_is_first():
    assert settings.MIDDLEWARE[0] == "app.probes.HealthCheckMiddleware"


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/startupz"])
@pytest.mark.parametrize("host", CHECKER_HOSTS)
def test_health_paths_answer_any_host(client, path, host):
    r = client.get(path, HTTP_HOST=host)
    assert r.status_code == 200, r.content
    assert r.json()["status"] == "ok"


@pytest.mark.parametrize("path", ["/accounts/login/", "/", "/healthz/", "/readyz/extra", "/admin/"])
def test_other_paths_still_refuse_an_unknown_host(client, path):
    assert client.get(path, HTTP_HOST="172.19.17.130:8000").status_code == 400


def test_positive_control_allowed_host_reaches_the_page(client):
    assert client.get("/accounts/login/", HTTP_HOST="chat.example.com").status_code == 200


@pytest.mark.parametrize("method", ["post", "put", "delete"])
def test_only_get_and_head_bypass_host_validation(client, method):
    assert getattr(client, method)("/healthz", HTTP_HOST="evil.example").status_code == 400
    assert client.head("/healthz", HTTP_HOST="evil.example").status_code == 200


async def asgi_get(path: str, host: str) -> int:
    """One GET through Django's ASGI handler with exactly this Host header."""
    from django.core.handlers.asgi import ASGIHandler

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", host.encode())], "client": ("10.0.0.9", 40000), "server": ("10.0.0.1", 8000)}
    sent, requests = [], [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive():
        if requests:
            return requests.pop()
        await asyncio.Event().wait()  # the client stays connected; Django cancels this when done

    async def send(message):
        sent.append(message)

    await ASGIHandler()(scope, receive, send)
    return next(m["status"] for m in sent if m["type"] == "http.response.start")


async def test_async_path_answers_any_host_and_refuses_others():
    for path in ("/healthz", "/readyz", "/startupz"):
        assert await asgi_get(path, "172.19.17.130:8000") == 200, path
    assert await asgi_get("/accounts/login/", "172.19.17.130:8000") == 400
    assert await asgi_get("/accounts/login/", "chat.example.com") == 200


def test_startupz_checks_dependencies_until_they_passed_once(client, monkeypatch):
    """Before the first success /startupz is /readyz (a 503 names the failing
    part); after it, a dependency outage no longer fails it."""
    outage = {"down": True}

    async def fake_round_trip():
        if outage["down"]:
            raise ConnectionError("redis down")

    monkeypatch.setattr("app.health._round_trip", fake_round_trip)
    monkeypatch.setattr("app.health.READY_CACHE_SECONDS", 0.0)  # each call checks afresh
    r = client.get("/startupz", HTTP_HOST="10.0.3.7")
    assert r.status_code == 503 and r.json()["checks"]["channel_layer"] == "error: ConnectionError"
    assert not probes.started()
    outage["down"] = False
    r = client.get("/startupz", HTTP_HOST="10.0.3.7")
    assert r.status_code == 200 and probes.started()
    outage["down"] = True
    # /readyz reports the outage; /startupz does not pull the instance out.
    assert client.get("/readyz", HTTP_HOST="10.0.3.7").status_code == 503
    r = client.get("/startupz", HTTP_HOST="10.0.3.7")
    assert r.status_code == 200 and r.json()["started"] is True
    assert r["Cache-Control"] == "no-store"


def test_start_flag_is_shared_memory_a_forked_worker_sees():
    """gunicorn forks workers from the master that imported app.probes: a
    child's mark is visible to the parent and to its siblings."""
    import os

    pid = os.fork()
    if pid == 0:  # the "worker"
        probes.mark_started()
        os._exit(0)
    os.waitpid(pid, 0)
    assert probes.started()


def test_health_bodies_are_json(client):
    body = json.loads(client.get("/healthz", HTTP_HOST="x").content)
    assert body == {"status": "ok"}
