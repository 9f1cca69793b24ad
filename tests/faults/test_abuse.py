"""Who gets in: anonymous sockets, foreign Origin, bad Host, missing CSRF,
forged sessions and path tricks are refused with the right status, and no
refusal leaks anything (traceback, paths, settings, secrets). Django's
plain CSRF page ("More information is available with DEBUG=True") is fine.

Handshakes and requests are written by hand on raw sockets so that paths
reach the server exactly as given (no client-side normalisation).
"""
from __future__ import annotations

import base64
import os
import re
import socket

import pytest

from tests.faults import results
from tests.faults.conftest import cookie_header, log_problems

pytestmark = pytest.mark.integration

LEAKS = ("Traceback", "/work/", "site-packages", "settings.py", "SECRET_KEY", "DATABASE_URL", "psycopg", "django.db",
         "DEBUG = True", "Exception", "Request Method", "File \"")


def raw(port, request: bytes, timeout=10) -> tuple[int, str]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = re.search(rb"(?i)content-length:\s*(\d+)", head)
        if length:
            while len(body) < int(length.group(1)):
                chunk = s.recv(65536)
                if not chunk:
                    break
                body += chunk
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    return status, (head + b"\r\n\r\n" + body).decode("latin-1")


def handshake(port, path, host="127.0.0.1", origin="https://127.0.0.1", cookie=None, extra=b"") -> tuple[int, str]:
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13", "X-Forwarded-Proto: https"]
    if origin is not None:
        lines.append(f"Origin: {origin}")
    if cookie:
        lines.append(f"Cookie: {cookie}")
    return raw(port, ("\r\n".join(lines) + "\r\n").encode() + extra + b"\r\n")


def http(port, method, path, host="127.0.0.1", headers=(), body=b""):
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "X-Forwarded-Proto: https", "Connection: close", *headers]
    if body:
        lines += ["Content-Type: application/x-www-form-urlencoded", f"Content-Length: {len(body)}"]
    return raw(port, ("\r\n".join(lines) + "\r\n\r\n").encode() + body)


def leaks(text: str, secrets_: list[str]) -> list[str]:
    return [m for m in (*LEAKS, *secrets_) if m and m in text]


def test_refusals_have_the_right_status_and_leak_nothing(stack, users, make_room):
    port = stack.port
    user = users[2]
    cookie = cookie_header(user)
    room = make_room()
    secrets_ = [stack.env["SECRET_KEY"], stack.postgres.password, user.cookies.get("sessionid", "")]
    ws = f"/ws/rooms/{room}/"
    cases = [
        # (name, expected status, (status, text))
        ("ws: valid (control)", 101, handshake(port, ws, cookie=cookie)),
        ("ws: anonymous", 403, handshake(port, ws)),
        ("ws: forged session", 403, handshake(port, ws, cookie="sessionid=" + "x" * 32)),
        ("ws: foreign Origin", 403, handshake(port, ws, origin="https://evil.example", cookie=cookie)),
        ("ws: look-alike Origin", 403, handshake(port, ws, origin="https://127.0.0.1.evil.example", cookie=cookie)),
        ("ws: Origin null", 403, handshake(port, ws, origin="null", cookie=cookie)),
        ("ws: no Origin", 403, handshake(port, ws, origin=None, cookie=cookie)),
        ("ws: bad Host", 403, handshake(port, ws, host="evil.example", cookie=cookie)),
        ("ws: bad Host, matching Origin", 403, handshake(port, ws, host="evil.example", origin="https://evil.example", cookie=cookie)),
    ]
    tricks = [f"/ws/rooms/../rooms/{room}/", f"/ws/rooms/{room}/../{room}/", "/ws/rooms/%2e%2e/", f"/ws/rooms/{room}%2F/",
              "/ws/rooms/-1/", "/ws/rooms/0/", "/ws/rooms/99999999999999999999999/", "/ws/rooms/9223372036854775807/",
              f"/ws/rooms/{room}x/", "/ws/rooms/\uff11/", f"/ws/rooms/{room}/extra/",
              f"//ws/rooms/{room}/", "/ws/rooms/%00/", "/ws/../../etc/passwd", "/ws/rooms/1e3/", "/ws/rooms/ 1/".replace(" ", "%20")]
    for path in tricks:
        # Non-ASCII in the request line is refused by the HTTP parser itself (400).
        cases.append((f"ws: path {path!r}", 403 if path.isascii() else 400, handshake(port, path, cookie=cookie)))
    # a valid room with odd query strings is still the valid room
    for query in ("?after=-5", "?after=abc", "?after=99999999999999999999999999", "?after=1&after=2"):
        cases.append((f"ws: query {query}", 101, handshake(port, ws + query, cookie=cookie)))

    # HTTP
    page = http(port, "GET", "/", headers=[f"Cookie: {cookie}"])
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page[1]).group(1)
    form = f"csrfmiddlewaretoken={token}&name=csrf-test".encode()
    cases += [
        ("http: bad Host", 400, http(port, "GET", "/accounts/login/", host="evil.example")),
        # Health paths answer any Host (platform checkers use the private address, app/probes.py).
        ("http: any Host on /healthz", 200, http(port, "GET", "/healthz", host="evil.example")),
        ("http: bad Host on a POST to /healthz", 400, http(port, "POST", "/healthz", host="evil.example")),
        ("http: missing CSRF token", 403, http(port, "POST", "/", headers=[f"Cookie: {cookie}", "Origin: https://127.0.0.1"], body=b"name=no-token")),
        ("http: CSRF token without its cookie", 403, http(port, "POST", "/", headers=[f"Cookie: sessionid={user.cookies['sessionid']}",
                                                                                   "Origin: https://127.0.0.1"], body=form)),
        ("http: foreign Origin with token", 403, http(port, "POST", "/", headers=[f"Cookie: {cookie}", "Origin: https://evil.example"], body=form)),
        ("http: login without CSRF", 403, http(port, "POST", "/accounts/login/", headers=["Origin: https://127.0.0.1"],
                                               body=b"username=a&password=b")),
        ("http: anonymous room page", 302, http(port, "GET", f"/rooms/{room}/")),
        ("http: control (token, same Origin)", 302, http(port, "POST", "/", headers=[f"Cookie: {cookie}", "Origin: https://127.0.0.1",
                                                                                     "Referer: https://127.0.0.1/"], body=form)),
    ]
    for path in ("/rooms/../admin/", "/rooms/%2e%2e/%2e%2e/etc/passwd", "/rooms/99999999999999999999999/", "/rooms/-1/",
                 "/rooms/0/", "/rooms/1%00/", f"/rooms/{room}x/", "/static/../app/settings.py", "/static/%2e%2e/manage.py"):
        cases.append((f"http: path {path!r}", 404, http(port, "GET", path, headers=[f"Cookie: {cookie}"])))

    failures, leaked = [], []
    for name, expected, (status, text) in cases:
        if status != expected:
            failures.append(f"{name}: expected {expected}, got {status}")
        if expected != 101 and (found := leaks(text, secrets_)):
            leaked.append(f"{name}: {found}")
    log = stack.gunicorn.log()
    results.record(
        "abuse",
        scenario="Anonymous / forged session / foreign or missing Origin / bad Host / missing CSRF / path tricks",
        checked="each refused with the expected status (ws 403, Host 400, CSRF 403, unknown paths 404); no traceback, "
                "path, setting or secret in any answer or the log",
        figure=f"{len(cases)} requests, {len(cases) - len(failures)} with the expected status, {len(leaked)} leaks",
        cases=len(cases), failures=failures, leaks=leaked,
    )
    assert not failures, "\n".join(failures)
    assert not leaked, "\n".join(leaked)
    assert not log_problems(log), "\n".join(log_problems(log)[:20])


def test_room_names_with_tricks_are_plain_text(stack, users):
    user = users[3]
    names = ["../../etc/passwd", "<script>alert('room')</script>", "%2e%2e%2f", "{{ settings.SECRET_KEY }}", "\u202eevil"]
    ids = []
    for name in names:
        response = user.form_post("/", {"name": name + " " + os.urandom(2).hex()})
        assert response.status_code == 302
        location = response.headers["location"]
        assert re.fullmatch(r"/rooms/\d+/", location), location
        ids.append(int(location.split("/")[2]))
    listing = user.request("GET", "/").text
    assert "<script>alert('room')</script>" not in listing
    assert "&lt;script&gt;alert(&#x27;room&#x27;)&lt;/script&gt;" in listing
    assert stack.env["SECRET_KEY"] not in listing
    for room_id in ids:
        page = user.request("GET", f"/rooms/{room_id}/")
        assert page.status_code == 200 and "<script>alert('room')" not in page.text
