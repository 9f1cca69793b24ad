"""Black-box verifier: checks a deployed chat over HTTP and websockets only.

Usable against any deployment:

    python -m tests.contract.verify https://chat.example.com
    CHAT_VERIFY_USERS="alice:pw1,bob:pw2" python -m tests.contract.verify https://chat.example.com

Without CHAT_VERIFY_USERS it signs up two throwaway users. Options for targets
reached through a stand-in for the platform's router (tests on this machine):
`--host` sends that Host (the public name) while connecting to URL,
`--https-proxy` adds `X-Forwarded-Proto: https` as a TLS-terminating proxy
would, `--insecure` accepts a self-signed certificate, and `--second-url`
connects the second user through another instance (cross-host fan-out).
Prints one line per check and `N passed, N failed`; exits 1 on any failure.
"""
from __future__ import annotations

import argparse
import http.cookies
import json
import os
import re
import secrets
import socket
import ssl
import sys
import time
from dataclasses import dataclass, field
from functools import cached_property
from urllib.parse import urlsplit

import httpx
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

from tests.contract.tls import LockedTLSSocket

TIMEOUT = 15.0


class CheckFailed(AssertionError):
    pass


def expect(condition, message):
    if not condition:
        raise CheckFailed(message)


@dataclass
class Endpoint:
    """Where to connect (url) and who the server must think it is (host)."""

    url: str
    host: str
    https_proxy: bool
    insecure: bool

    @property
    def split(self):
        return urlsplit(self.url)

    @property
    def secure(self) -> bool:
        return self.split.scheme == "https" or self.https_proxy

    @property
    def origin(self) -> str:
        return f"{'https' if self.secure else 'http'}://{self.host}"

    def headers(self, extra=None) -> dict:
        headers = {"Host": self.host}
        if self.https_proxy:
            headers["X-Forwarded-Proto"] = "https"
        headers.update(extra or {})
        return headers

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, verify=not self.insecure, timeout=TIMEOUT, follow_redirects=False)

    @cached_property
    def ssl_context(self):
        # Built once: loading the system CA store costs ~30 ms per connect.
        if self.split.scheme != "https":
            return None
        ctx = ssl.create_default_context()
        if self.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def websocket(self, path: str, cookies: dict | None = None, origin: str | None = None):
        """Open a websocket to `path`; raises InvalidStatus if the handshake is refused."""
        sock = socket.create_connection((self.split.hostname, self.split.port or (443 if self.split.scheme == "https" else 80)), timeout=TIMEOUT)
        extra = {}
        if cookies:
            extra["Cookie"] = "; ".join(f"{k}={v}" for k, v in cookies.items())
        if self.https_proxy:
            extra["X-Forwarded-Proto"] = "https"
        ctx = self.ssl_context
        if ctx:
            # TLS on our side (tests/contract/tls.py: websockets' own TLS can hang
            # a connect under TLS 1.3), so the URI says ws:// to websockets.
            try:
                sock = LockedTLSSocket(sock, ctx, server_hostname=self.host.split(":")[0])
            except BaseException:
                sock.close()
                raise
            sock.settimeout(None)
        return ws_connect(
            f"ws://{self.host}{path}",
            sock=sock,
            origin=origin if origin is not None else self.origin,
            additional_headers=extra,
            open_timeout=TIMEOUT,
            close_timeout=2,
        )


@dataclass
class User:
    endpoint: Endpoint
    username: str
    password: str
    cookies: dict = field(default_factory=dict)

    def _keep(self, response: httpx.Response):
        for header in response.headers.get_list("set-cookie"):
            jar = http.cookies.SimpleCookie()
            jar.load(header)
            for name, morsel in jar.items():
                self.cookies[name] = morsel.value

    def request(self, method, path, data=None, extra=None) -> httpx.Response:
        # Cookies are sent by hand: they are Secure, and a stand-in proxy may be plain HTTP.
        headers = self.endpoint.headers(extra)
        if self.cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        with self.endpoint.client() as client:
            response = client.request(method, path, data=data, headers=headers)
        self._keep(response)
        return response

    def form_post(self, path, fields) -> httpx.Response:
        page = self.request("GET", path)
        expect(page.status_code == 200, f"GET {path}: {page.status_code}")
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
        expect(token, f"no CSRF token on {path}")
        origin = self.endpoint.origin
        return self.request(
            "POST", path, data={"csrfmiddlewaretoken": token.group(1), **fields},
            extra={"Origin": origin, "Referer": f"{origin}{path}"},
        )

    def log_in(self, sign_up: bool):
        if sign_up:
            response = self.form_post("/accounts/signup/", {"username": self.username, "password1": self.password, "password2": self.password})
            expect(response.status_code == 302, f"sign-up of {self.username} answered {response.status_code}")
        else:
            response = self.form_post("/accounts/login/", {"username": self.username, "password": self.password})
            expect(response.status_code == 302, f"log-in of {self.username} answered {response.status_code} (check CHAT_VERIFY_USERS)")
        expect("sessionid" in self.cookies, f"no session cookie after logging in {self.username}")


class Room:
    def __init__(self, room_id: int, ws_path: str, ws_url: str):
        self.id, self.ws_path, self.ws_url = room_id, ws_path, ws_url


def read_until(ws, predicate, timeout=TIMEOUT):
    """Frames until one satisfies predicate; returns (frame, frames seen)."""
    seen = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise CheckFailed(f"no expected frame within {timeout:.0f}s; got {[f[:120] for f in seen]}")
        try:
            frame = ws.recv(timeout=left)
        except TimeoutError:
            continue
        seen.append(frame)
        if predicate(frame):
            return frame, seen


class Context:
    """What the checks share: the endpoints, two logged-in users and a room."""

    def __init__(self, endpoint: Endpoint, second: Endpoint | None = None):
        self.endpoint = endpoint
        self.second = second or endpoint

    @cached_property
    def users(self) -> tuple[User, User]:
        given = os.environ.get("CHAT_VERIFY_USERS", "").strip()
        if given:
            pairs = [item.split(":", 1) for item in given.split(",")]
            expect(len(pairs) >= 2 and all(len(p) == 2 for p in pairs), "CHAT_VERIFY_USERS must be 'user:password,user:password'")
            users = (User(self.endpoint, *pairs[0]), User(self.second, *pairs[1]))
            sign_up = False
        else:
            tag = secrets.token_hex(4)
            users = tuple(User(ep, f"verify-{tag}-{n}", secrets.token_urlsafe(18)) for n, ep in ((1, self.endpoint), (2, self.second)))
            sign_up = True
        for user in users:
            user.log_in(sign_up)
        return users

    @cached_property
    def room(self) -> Room:
        owner = self.users[0]
        response = owner.form_post("/", {"name": f"verify {secrets.token_hex(4)}"})
        expect(response.status_code == 302, f"creating a room answered {response.status_code}")
        match = re.search(r"/rooms/(\d+)/", response.headers.get("location", ""))
        expect(match, f"room creation redirected to {response.headers.get('location')!r}")
        page = owner.request("GET", f"/rooms/{match.group(1)}/")
        expect(page.status_code == 200, f"room page answered {page.status_code}")
        ws_path = re.search(r'ws-connect="([^"]+)"', page.text)
        ws_url = re.search(r'data-ws-url="([^"]+)"', page.text)
        expect(ws_path and ws_url, "room page has no ws-connect / data-ws-url")
        return Room(int(match.group(1)), ws_path.group(1), ws_url.group(1))


# --- the checks -------------------------------------------------------------

def check_liveness(ctx: Context):
    with ctx.endpoint.client() as c:
        r = c.get("/healthz", headers=ctx.endpoint.headers())
    expect(r.status_code == 200 and r.json().get("status") == "ok", f"/healthz: {r.status_code} {r.text[:200]}")


def check_readiness(ctx: Context):
    with ctx.endpoint.client() as c:
        r = c.get("/readyz", headers=ctx.endpoint.headers())
    expect(r.status_code == 200, f"/readyz: {r.status_code} {r.text[:200]}")
    body = r.json()
    expect(body.get("checks", {}).get("database") == "ok" and body["checks"].get("channel_layer") == "ok", f"/readyz body: {body}")


def check_debug_off(ctx: Context):
    path = f"/no-such-page-{secrets.token_hex(4)}/"
    with ctx.endpoint.client() as c:
        r = c.get(path, headers=ctx.endpoint.headers())
    expect(r.status_code == 404, f"{path}: expected 404, got {r.status_code}")
    for marker in ("Using the URLconf", "DEBUG = True", "Traceback", "technical_404"):
        expect(marker not in r.text, f"the 404 page shows debug output ({marker!r}): DEBUG is on")


def check_security_headers(ctx: Context):
    expect(ctx.endpoint.secure, "target is plain HTTP with no TLS proxy: pass an https URL or --https-proxy")
    with ctx.endpoint.client() as c:
        r = c.get("/accounts/login/", headers=ctx.endpoint.headers())
    expect(r.status_code == 200, f"/accounts/login/: {r.status_code}")
    hsts = r.headers.get("strict-transport-security", "")
    expect("max-age=" in hsts and int(re.search(r"max-age=(\d+)", hsts).group(1)) > 0, f"HSTS missing: {hsts!r}")
    expect(r.headers.get("x-content-type-options") == "nosniff", "X-Content-Type-Options: nosniff missing")
    expect(r.headers.get("x-frame-options") == "DENY", f"X-Frame-Options: {r.headers.get('x-frame-options')!r}")
    expect(r.headers.get("referrer-policy"), "Referrer-Policy missing")
    cookies = r.headers.get_list("set-cookie")
    expect(any(c.startswith("csrftoken=") for c in cookies), "no CSRF cookie set on the login page")
    expect(all("secure" in c.lower() for c in cookies), f"a cookie without Secure: {cookies}")


def check_https_redirect(ctx: Context):
    ep = ctx.endpoint
    if ep.split.scheme == "https":
        plain = Endpoint(f"http://{ep.split.netloc}", ep.host, False, ep.insecure)  # port 80 of the same front door
        if ep.split.port not in (None, 443):
            return  # a test proxy on a custom port: no plain-HTTP port to try
    else:
        expect(ep.https_proxy, "plain HTTP target without --https-proxy: cannot check the redirect")
        plain = Endpoint(ep.url, ep.host, False, ep.insecure)
    with plain.client() as c:
        r = c.get("/accounts/login/", headers=plain.headers())
    expect(r.status_code in (301, 302, 307, 308), f"plain HTTP was answered with {r.status_code}, not a redirect")
    expect(r.headers.get("location", "").startswith(f"https://{ep.host}"), f"redirect to {r.headers.get('location')!r}")


def check_websocket_url_points_here(ctx: Context):
    expected = f"{'wss' if ctx.endpoint.secure else 'ws'}://{ctx.endpoint.host}{ctx.room.ws_path}"
    expect(
        ctx.room.ws_url == expected,
        f"the page advertises {ctx.room.ws_url!r}, expected {expected!r}: the Site domain (SITE_DOMAIN) is wrong",
    )
    expect(ctx.room.ws_path.startswith("/ws/"), f"ws-connect should be a path, got {ctx.room.ws_path!r}")


def _refused(open_socket) -> int | None:
    try:
        with open_socket():
            return None
    except InvalidStatus as exc:
        return exc.response.status_code


def check_foreign_origin_refused(ctx: Context):
    user = ctx.users[0]
    status = _refused(lambda: ctx.endpoint.websocket(ctx.room.ws_path, user.cookies, origin="https://evil.example"))
    expect(status == 403, f"a foreign Origin was {'accepted' if status is None else f'answered {status}'}")


def check_anonymous_refused(ctx: Context):
    status = _refused(lambda: ctx.endpoint.websocket(ctx.room.ws_path, cookies=None))
    expect(status == 403, f"an anonymous socket was {'accepted' if status is None else f'answered {status}'}")


def _has_message(text):
    needle = json.dumps(text)[1:-1]  # no HTML specials in our probes
    return lambda frame: "data-msg-id" in frame and needle in frame


def check_two_clients_fan_out(ctx: Context):
    one, two = ctx.users
    path = ctx.room.ws_path
    with ctx.endpoint.websocket(path, one.cookies) as ws1, ctx.second.websocket(path, two.cookies) as ws2:
        for sender, text in ((ws1, f"hello from one {secrets.token_hex(4)}"), (ws2, f"hello from two {secrets.token_hex(4)}")):
            sender.send(json.dumps({"message": text}))
            read_until(ws1, _has_message(text))
            read_until(ws2, _has_message(text))


def check_escaped_and_bad_frames(ctx: Context):
    one = ctx.users[0]
    with ctx.endpoint.websocket(ctx.room.ws_path, one.cookies) as ws:
        ws.send("this is not json")
        frame, _ = read_until(ws, lambda f: "data-error=" in f)
        expect('data-error="bad_json"' in frame, f"bad JSON answered with {frame[:200]!r}")
        ws.send(json.dumps({"message": "x" * 20_000}))
        frame, _ = read_until(ws, lambda f: "data-error=" in f)
        expect('data-error="too_long"' in frame, f"a too-long message answered with {frame[:200]!r}")
        tag = secrets.token_hex(4)
        ws.send(json.dumps({"message": f"<script>alert({tag})</script>"}))
        frame, _ = read_until(ws, lambda f: "data-msg-id" in f and tag in f)
        expect(f"&lt;script&gt;alert({tag})&lt;/script&gt;" in frame, f"message not escaped: {frame[:300]!r}")


CHECKS = [
    check_liveness,
    check_readiness,
    check_debug_off,
    check_security_headers,
    check_https_redirect,
    check_websocket_url_points_here,
    check_foreign_origin_refused,
    check_anonymous_refused,
    check_two_clients_fan_out,
    check_escaped_and_bad_frames,
]


def build_context(url, host=None, https_proxy=False, insecure=False, second_url=None) -> Context:
    first = Endpoint(url.rstrip("/"), host or urlsplit(url).netloc, https_proxy, insecure)
    second = Endpoint(second_url.rstrip("/"), host or urlsplit(second_url).netloc, https_proxy, insecure) if second_url else None
    return Context(first, second)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url")
    parser.add_argument("--host", help="Host header / public name to present (default: the URL's)")
    parser.add_argument("--https-proxy", action="store_true", help="send X-Forwarded-Proto: https")
    parser.add_argument("--insecure", action="store_true", help="accept a self-signed certificate")
    parser.add_argument("--second-url", help="connect the second user through this URL")
    args = parser.parse_args(argv)
    ctx = build_context(args.url, args.host, args.https_proxy, args.insecure, args.second_url)
    passed = failed = 0
    for check in CHECKS:
        name = check.__name__.removeprefix("check_")
        try:
            check(ctx)
        except Exception as exc:  # report every check, then fail
            failed += 1
            print(f"FAIL {name}: {exc}")
        else:
            passed += 1
            print(f"PASS {name}")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
