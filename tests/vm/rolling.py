"""Websocket clients that keep going through a rolling redeploy.

A Follower stays connected to one web host through its nginx and, when the
connection drops (gunicorn closes websockets with 1012 on restart, or nginx
answers 502 while the host is down), reconnects with `?after=<cursor>` as the
browser client does (the highest seq below which it has every message:
tests/harness/chat_client.Shown), so the server replays what it missed. A Sender posts
numbered messages through whichever host answers. A Prober records /healthz of
every host so the test can tell whether hosts were down at the same time.
"""
from __future__ import annotations

import json
import re
import secrets
import threading
import time

import httpx

from tests.contract.verify import Endpoint, User, read_until
from tests.harness.chat_client import Shown

MSG = re.compile(r'data-msg-id="(\d+)"')


class Follower(threading.Thread):
    def __init__(self, name: str, endpoint: Endpoint, user: User, ws_path: str, stop: threading.Event):
        super().__init__(name=name, daemon=True)
        self.endpoint, self.user, self.ws_path, self.stop = endpoint, user, ws_path, stop
        self.shown = Shown()
        self.frames: list[str] = []
        self.connects = 0
        self.connect_log: list[str] = []  # "time after=<id>", for the failure report
        self.last_frame_at = 0.0
        self.drops: list[str] = []
        self.lock = threading.Lock()

    def seen_text(self) -> str:
        with self.lock:
            return "\n".join(self.frames)

    def report(self) -> str:
        return (f"{self.name}: connected {self.connect_log}, cursor {self.shown.after}, "
                f"last frame at {self.last_frame_at:.1f}, drops {self.drops}")

    def run(self):
        while not self.stop.is_set():
            try:
                with self.endpoint.websocket(f"{self.ws_path}?after={self.shown.after}", self.user.cookies) as ws:
                    self.connects += 1
                    self.connect_log.append(f"{time.monotonic():.1f} after={self.shown.after}")
                    while not self.stop.is_set():
                        try:
                            frame = ws.recv(timeout=0.5)
                        except TimeoutError:
                            continue
                        with self.lock:
                            self.frames.append(frame)
                            self.last_frame_at = time.monotonic()
                        self.shown.apply(frame)
            except Exception as exc:  # closed by a restart, 502 from nginx, refused ...
                self.drops.append(f"{time.monotonic():.1f} {type(exc).__name__}: {str(exc)[:120]}")
                time.sleep(0.3)


class Sender(threading.Thread):
    """One message every `interval` seconds; a message counts as sent once the
    server echoed it back (so it is stored)."""

    def __init__(self, endpoints: list[Endpoint], user: User, ws_path: str, stop: threading.Event, interval=0.3):
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
            for endpoint in self.endpoints[n % 2:] + self.endpoints[: n % 2]:
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
