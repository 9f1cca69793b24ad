"""Unsafe settings refuse to start, and the websocket Origin check compares
scheme, host and port, on the production runtime: the production lock's
gunicorn and manage.py (tests/harness/prod_venv.py), 2 workers, Redis,
PostgreSQL."""
from __future__ import annotations

import base64
import os
import secrets
import socket

import pytest

from tests.faults import results
from tests.faults.conftest import cookie_header, log_problems
from tests.harness import chat_client as cc
from tests.harness.services import Gunicorn, manage
from tests.harness.stack import app_env

pytestmark = pytest.mark.integration

UNSAFE = {
    "ALLOWED_HOSTS": "*",
    "SECRET_KEY": "too-short-" + secrets.token_hex(8),
    "DATABASE_URL": "sqlite:///db.sqlite3",
}


def handshake(port, path, host, origin, cookie) -> int:
    lines = [f"GET {path} HTTP/1.1", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}", "Sec-WebSocket-Version: 13",
             "X-Forwarded-Proto: https", f"Cookie: {cookie}"]
    if host is not None:
        lines.insert(1, f"Host: {host}")
    if origin is not None:
        lines.append(f"Origin: {origin}")
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = s.recv(65536).split(b"\r\n", 1)[0]
    return int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0


def test_unsafe_settings_stop_the_production_runtime(redis, postgres):
    refused = {}
    for name, value in UNSAFE.items():
        env = app_env(redis, postgres, **{name: value})
        with pytest.raises(RuntimeError) as gunicorn_exit:
            Gunicorn(env).start(ready_timeout=60)
        log = str(gunicorn_exit.value)
        release = manage(env, "migrate", "--noinput", check=False)
        refused[name] = (f"Configuration error: {name} " in log and "Booting worker" not in log,
                         release.returncode != 0 and release.stderr.strip().startswith(f"Configuration error: {name} "))
        assert value not in log + release.stderr or name != "SECRET_KEY"
    # positive control: the opt-in for a platform that needs the wildcard, and Render's generated key shape
    render_key = base64.b64encode(os.urandom(32)).decode()
    opted_in = Gunicorn(app_env(redis, postgres, ALLOWED_HOSTS="*", ALLOW_ANY_HOST="True", SITE_DOMAIN="chat.example.com",
                                SECRET_KEY=render_key)).start(ready_timeout=60)
    opted_in.stop()
    results.record(
        "unsafe-settings",
        scenario="Unsafe settings with DEBUG=False: ALLOWED_HOSTS=*, a short SECRET_KEY, a SQLite DATABASE_URL",
        checked="gunicorn's master (production lock) exits before booting a worker, and manage.py migrate exits, each with one line naming the variable; "
                "ALLOWED_HOSTS=* with ALLOW_ANY_HOST=True and Render's generated key shape (44-character base64) start",
        figure=", ".join(f"{name}: gunicorn {'refused' if g else 'STARTED'}, migrate {'refused' if m else 'RAN'}"
                         for name, (g, m) in refused.items()) + "; opt-in + Render-shaped key: started",
    )
    assert refused == {name: (True, True) for name in UNSAFE}, refused


def test_origin_scheme_host_and_port_on_the_stack(stack, users, spawn, redis):
    port = stack.port
    cookie = cookie_header(users[1])
    path = f"/ws/rooms/{cc.create_room(users[1])}/"
    here = f"127.0.0.1:{port}"
    cases = {
        "own origin (control)": (here, f"https://{here}", 101),
        "http, another port": (here, "http://127.0.0.1:6666", 403),
        "https, another port": (here, "https://127.0.0.1:6666", 403),
        "http, same port (HTTPS site)": (here, f"http://{here}", 403),
        "default port, Host has one": (here, "https://127.0.0.1", 403),
        "no Host header": (None, f"https://{here}", None),
    }
    answers = {name: handshake(port, path, host, origin, cookie) for name, (host, origin, _) in cases.items()}
    # ALLOWED_HOSTS=* (opted in): still only the origin of the Host the client used.
    wildcard = spawn(redis=redis, ALLOWED_HOSTS="*", ALLOW_ANY_HOST="True", SITE_DOMAIN="chat.example.com")
    any_host = f"any.example:{wildcard.port}"
    answers["wildcard: same host (control)"] = handshake(wildcard.port, path, any_host, f"https://{any_host}", cookie)
    answers["wildcard: foreign origin"] = handshake(wildcard.port, path, any_host, f"https://evil.example:{wildcard.port}", cookie)
    expected = {name: want for name, (_, _, want) in cases.items()}
    expected.update({"wildcard: same host (control)": 101, "wildcard: foreign origin": 403})
    results.record(
        "origin",
        scenario="Websocket Origin vs the Host the client connected through (HTTPS site on port P)",
        checked="only https://host:P of the Host header is accepted (another scheme or port refused with 403); no Host header refused; "
                "ALLOWED_HOSTS=* keeps the check (same host only)",
        figure="; ".join(f"{name}: {status}" for name, status in answers.items()),
    )
    # Without a Host header the HTTP parser or the guard refuses: anything but 101.
    assert answers.pop("no Host header") not in (101, 0)
    expected.pop("no Host header")
    assert answers == expected, answers
    assert not log_problems(stack.gunicorn.log() + wildcard.log())
