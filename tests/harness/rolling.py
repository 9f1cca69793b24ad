"""Websocket clients that keep going through a rolling redeploy, shared by
every target's redeploy test (tests/vm, tests/platforms, tests/k8s), so a
change to how the page resumes (the reconnect cursor) is made here once.

A Follower stays connected through an endpoint and, when the connection drops
(gunicorn closes websockets with 1012 on restart, a proxy answers 502, the
instance is gone), reconnects with `?after=<cursor>` (the highest seq below
which it has every message: tests/harness/chat_client.Shown) as the browser client
does, so the server replays what it missed. The endpoint may be a callable
that returns one (a load balancer's choice among the instances in rotation).
A Sender posts numbered messages through whichever endpoint answers. A Prober
records /healthz of every host so the test can tell whether hosts were down
at the same time.
"""
from __future__ import annotations

import json
import random
import re
import secrets
import threading
import time

import httpx

from tests.contract.verify import Endpoint, User, read_until
from tests.harness.chat_client import Shown

MSG = re.compile(r'data-msg-id="(\d+)"')


class Follower(threading.Thread):
    def __init__(self, name: str, endpoint, user: User, ws_path: str, stop: threading.Event):
        super().__init__(name=name, daemon=True)
        self.endpoint, self.user, self.ws_path, self.stop = endpoint, user, ws_path, stop
        self.shown = Shown()  # what the page shows; its cursor is the reconnect's ?after=
        self.ids: list[int] = []   # every message id shown, in order
        # What the server must never do: send a message twice on one connection,
        # or replay one at or below the cursor the client connected with. (A
        # replay may resend one shown *above* the cursor: the page drops it.)
        self.resent_wrongly: list[int] = []
        self.frames: list[str] = []
        self.connects = 0
        self.connect_log: list[str] = []  # "time after=<id>", for the failure report
        self.last_frame_at = 0.0
        self.drops: list[str] = []
        self.lock = threading.Lock()

    def duplicates(self) -> list[int]:
        """Messages shown twice, or sent twice where the server must not."""
        with self.lock:
            seen, dup = set(), list(self.resent_wrongly)
            for i in self.ids:
                (dup.append(i) if i in seen else seen.add(i))
            return dup

    def seen_text(self) -> str:
        with self.lock:
            return "\n".join(self.frames)

    def report(self) -> str:
        return (f"{self.name}: connected {self.connect_log}, cursor {self.shown.after}, "
                f"last frame at {self.last_frame_at:.1f}, drops {self.drops}")

    def run(self):
        while not self.stop.is_set():
            try:
                endpoint = self.endpoint() if callable(self.endpoint) else self.endpoint
                after, on_this_connection = self.shown.after, set()
                with endpoint.websocket(f"{self.ws_path}?after={after}", self.user.cookies) as ws:
                    self.connects += 1
                    self.connect_log.append(f"{time.monotonic():.1f} after={after}")
                    while not self.stop.is_set():
                        try:
                            frame = ws.recv(timeout=0.5)
                        except TimeoutError:
                            continue
                        with self.lock:
                            self.frames.append(frame)
                            self.last_frame_at = time.monotonic()
                            parsed = Shown.parse(frame)
                            if parsed is not None:
                                message_id, seq = parsed
                                if message_id in on_this_connection or seq <= after:
                                    self.resent_wrongly.append(message_id)
                                on_this_connection.add(message_id)
                            shown = self.shown.apply(frame)
                            if shown is not None:
                                self.ids.append(shown)
            except Exception as exc:  # closed by a restart, 502 from nginx, refused ...
                self.drops.append(f"{time.monotonic():.1f} {type(exc).__name__}: {str(exc)[:120]}")
                time.sleep(0.3)


class Sender(threading.Thread):
    """One message every `interval` seconds; a message counts as sent once the
    server echoed it back (so it is stored)."""

    def __init__(self, endpoints, user: User, ws_path: str, stop: threading.Event, interval=0.3):
        super().__init__(name="sender", daemon=True)
        self.endpoints, self.user, self.ws_path, self.stop, self.interval = endpoints, user, ws_path, stop, interval
        self.tag = secrets.token_hex(3)
        self.confirmed: list[str] = []
        self.failures = 0
        self.log: list[str] = []  # "time text id=<id> via <url>" per confirmed message

    def run(self):
        n = 0
        while not self.stop.is_set():
            n += 1
            text = f"rolling-{self.tag}-{n:04d}"
            endpoints = self.endpoints() if callable(self.endpoints) else self.endpoints
            for endpoint in endpoints[n % 2:] + endpoints[: n % 2]:
                if self.attempt(endpoint, text):
                    break
            self.stop.wait(self.interval)

    def attempt(self, endpoint: Endpoint, text: str) -> bool:
        confirmed = False
        try:
            with endpoint.websocket(self.ws_path, self.user.cookies) as ws:
                ws.send(json.dumps({"message": text}))
                frame, _ = read_until(ws, lambda f: "data-msg-id" in f and text in f, timeout=5)
                self.confirmed.append(text)
                confirmed = True
                match = MSG.search(frame)
                self.log.append(f"{time.monotonic():.1f} {text} id={match.group(1) if match else '?'} via {endpoint.url}")
        except Exception:  # 502 while the host restarts, closed by a restart, no echo in time
            if not confirmed:
                self.failures += 1
        return confirmed


class Prober(threading.Thread):
    def __init__(self, endpoints: dict[str, Endpoint], stop: threading.Event, interval=0.2):
        super().__init__(name="prober", daemon=True)
        self.endpoints, self.stop, self.interval = endpoints, stop, interval
        self.samples: list[tuple[float, dict[str, bool]]] = []

    def run(self):
        clients = {name: ep.client() for name, ep in self.endpoints.items()}
        try:
            while not self.stop.is_set():
                up = {}
                for name, ep in self.endpoints.items():
                    try:
                        up[name] = clients[name].get("/healthz", headers=ep.headers(), timeout=5).status_code == 200
                    except httpx.HTTPError:
                        up[name] = False
                self.samples.append((time.monotonic(), up))
                self.stop.wait(self.interval)
        finally:
            for client in clients.values():
                client.close()

    def down_windows(self, name: str) -> int:
        """How many separate stretches `name` was down for."""
        windows, previous = 0, True
        for _, up in self.samples:
            if previous and not up[name]:
                windows += 1
            previous = up[name]
        return windows

    def all_down(self) -> list[float]:
        return [t for t, up in self.samples if not any(up.values())]


class Rotation:
    """The instances a load balancer currently sends new connections to (a
    Service's ready endpoints, a platform router's healthy instances)."""

    def __init__(self, endpoints: dict | None = None):
        self.lock = threading.Lock()
        self.endpoints = dict(endpoints or {})   # name -> Endpoint
        self.log: list[str] = []

    def add(self, name: str, endpoint: Endpoint):
        with self.lock:
            self.endpoints[name] = endpoint
            self.log.append(f"{time.monotonic():.1f} +{name}")

    def remove(self, name: str):
        with self.lock:
            self.endpoints.pop(name, None)
            self.log.append(f"{time.monotonic():.1f} -{name}")

    def pick(self) -> Endpoint:
        with self.lock:
            choices = list(self.endpoints.values())
        if not choices:
            raise ConnectionError("no instance in rotation")
        return random.choice(choices)

    def all(self) -> list[Endpoint]:
        with self.lock:
            return list(self.endpoints.values())


def delivery(followers: list[Follower], stored: list[int], timeout: float = 30.0) -> dict:
    """Wait until every follower has every stored message id, then report per
    follower what is missing and what arrived more than once."""
    deadline = time.monotonic() + timeout
    while True:
        report = {f.name: {"missing": sorted(set(stored) - set(f.ids)), "duplicated": f.duplicates()} for f in followers}
        if not any(r["missing"] for r in report.values()) or time.monotonic() > deadline:
            return report
        time.sleep(0.5)
