"""Black-box verifier: checks a deployed chat over HTTP and websockets only.

Usable against any deployment:

    python -m tests.contract.verify https://chat.example.com
    CHAT_VERIFY_USERS="alice:pw1,bob:pw2" python -m tests.contract.verify https://chat.example.com

Without CHAT_VERIFY_USERS it signs up two throwaway users. Options for targets
reached through a stand-in for the platform's router (tests on this machine):
`--host` sends that Host (the public name) while connecting to URL,
`--https-proxy` adds `X-Forwarded-Proto: https` as a TLS-terminating proxy
would, `--insecure` accepts a self-signed certificate, `--second-url`
connects the second user through another instance (cross-host fan-out), and
`--http-url` says where plain HTTP answers when HTTPS is not on port 443 (the
redirect check needs it: without it that check fails rather than guess).
Prints one line per check and `N passed, N failed`; exits 1 on any failure.
"""
from __future__ import annotations

import argparse
import dataclasses
import http.cookies
import json
import os
import re
import secrets
import ssl
import sys
import time
from dataclasses import dataclass, field
from functools import cached_property
from urllib.parse import urlsplit

import httpx
from websockets.exceptions import InvalidStatus

from tests.contract import ws_client
from tests.contract.ws_client import BlockingWebsocket

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

    def websocket(self, path: str, cookies: dict | None = None, origin: str | None = None) -> BlockingWebsocket:
        """Open a websocket to `path`; raises InvalidStatus if the handshake is refused."""
        extra = {}
        if cookies:
            extra["Cookie"] = "; ".join(f"{k}={v}" for k, v in cookies.items())
        if self.https_proxy:
            extra["X-Forwarded-Proto"] = "https"
        tls = self.split.scheme == "https"
        options = {"ssl": self.ssl_context} if tls else {}
        # The URI names the public host (Host header, TLS server name); host and
        # port say where the TCP connection goes.
        return ws_client.connect(
            f"{'wss' if tls else 'ws'}://{self.host}{path}",
            host=self.split.hostname,
            port=self.split.port or (443 if tls else 80),
            origin=origin if origin is not None else self.origin,
            additional_headers=extra,
            open_timeout=TIMEOUT,
            close_timeout=2,
            **options,
        )


@dataclass
class User:
    endpoint: Endpoint
    username: str
    password: str
    cookies: dict = field(default_factory=dict)
    set_cookie: dict = field(default_factory=dict)  # cookie name -> its last Set-Cookie header

    def _keep(self, response: httpx.Response):
        for header in response.headers.get_list("set-cookie"):
            jar = http.cookies.SimpleCookie()
            jar.load(header)
            for name, morsel in jar.items():
                self.cookies[name] = morsel.value
                self.set_cookie[name] = header

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

    def __init__(self, endpoint: Endpoint, second: Endpoint | None = None, http_url: str | None = None):
        self.endpoint = endpoint
        self.second = second or endpoint
        self.http_url = http_url.rstrip("/") if http_url else None

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


def cookie_flag_problems(set_cookie: str) -> list[str]:
    """What is missing from one Set-Cookie header for a cookie that must stay
    on HTTPS, out of scripts' reach and off cross-site requests."""
    attributes = [part.strip() for part in set_cookie.split(";")[1:]]
    names = {a.split("=", 1)[0].strip().lower(): a.split("=", 1)[1].strip() if "=" in a else "" for a in attributes}
    problems = []
    if "secure" not in names:
        problems.append("Secure")
    if "httponly" not in names:
        problems.append("HttpOnly")
    if names.get("samesite", "").lower() not in ("lax", "strict"):
        problems.append("SameSite=Lax or Strict")
    return problems


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


def check_session_cookie_after_login(ctx: Context):
    """The cookie that *is* the login: Secure, HttpOnly, SameSite, as set by
    the sign-up / log-in answer itself."""
    user = ctx.users[0]
    header = user.set_cookie.get("sessionid")
    expect(header, f"logging in set no sessionid cookie (cookies set: {sorted(user.set_cookie)})")
    problems = cookie_flag_problems(header)
    shown = re.sub(r"^([^=]*=)[^;]*", r"\1<value>", header)  # a real account's session stays out of the output
    expect(not problems, f"the session cookie lacks {', '.join(problems)}: {shown!r}")


def plain_http_url(ctx: Context) -> str:
    """Where plain HTTP answers for this target."""
    ep = ctx.endpoint
    if ctx.http_url:
        return ctx.http_url
    if ep.split.scheme == "https":
        expect(ep.split.port in (None, 443),
               f"HTTPS is on port {ep.split.port}: pass --http-url (where plain HTTP answers) to check the redirect")
        hostname = ep.split.hostname
        return f"http://[{hostname}]" if ":" in hostname else f"http://{hostname}"
    expect(ep.https_proxy, "plain HTTP target without --https-proxy: cannot check the redirect")
    return ep.url  # the same address, without X-Forwarded-Proto: https


def check_https_redirect(ctx: Context):
    ep = ctx.endpoint
    plain = dataclasses.replace(ep, url=plain_http_url(ctx), https_proxy=False)
    path = "/accounts/login/?next=/"
    with plain.client() as c:
        r = c.get(path, headers=plain.headers())
    expect(r.status_code in (301, 302, 307, 308), f"plain HTTP ({plain.url}) was answered with {r.status_code}, not a redirect")
    location = urlsplit(r.headers.get("location", ""))
    public = urlsplit(f"https://{ep.host}")
    expect(
        location.scheme == "https" and location.hostname == public.hostname and location.port in (public.port, None, 443)
        and f"{location.path}?{location.query}" == path,
        f"plain HTTP redirected to {r.headers.get('location')!r}, expected https://{ep.host}{path}",
    )


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
    check_session_cookie_after_login,
    check_https_redirect,
    check_websocket_url_points_here,
    check_foreign_origin_refused,
    check_anonymous_refused,
    check_two_clients_fan_out,
    check_escaped_and_bad_frames,
]


def build_context(url, host=None, https_proxy=False, insecure=False, second_url=None, http_url=None) -> Context:
    first = Endpoint(url.rstrip("/"), host or urlsplit(url).netloc, https_proxy, insecure)
    second = Endpoint(second_url.rstrip("/"), host or urlsplit(second_url).netloc, https_proxy, insecure) if second_url else None
    return Context(first, second, http_url)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url")
    parser.add_argument("--host", help="Host header / public name to present (default: the URL's)")
    parser.add_argument("--https-proxy", action="store_true", help="send X-Forwarded-Proto: https")
    parser.add_argument("--insecure", action="store_true", help="accept a self-signed certificate")
    parser.add_argument("--second-url", help="connect the second user through this URL")
    parser.add_argument("--http-url", help="where plain HTTP answers (default: port 80 of the URL's host, or the URL itself with --https-proxy)")
    args = parser.parse_args(argv)
    ctx = build_context(args.url, args.host, args.https_proxy, args.insecure, args.second_url, args.http_url)
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
