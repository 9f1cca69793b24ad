"""Hundreds of chat clients on real websockets, behaving like the room page.

Each client connects to /ws/rooms/<id>/?after=<newest id it shows>, records
every message id it receives (and when), and on any close reconnects with a
short jittered delay and ?after=<newest id seen> - exactly what room.js does
with htmx-ext-ws. The swarm runs on its own asyncio loop in a thread so a
test can stop Redis, kill workers or send signals while it runs.
"""
from __future__ import annotations

import asyncio
import json
import random
import re
import statistics
import threading
import time
from dataclasses import dataclass, field

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

MSG_ID = re.compile(r'data-msg-id="(\d+)"')
ERROR = re.compile(r'data-error="([a-z_]+)"')


@dataclass
class Client:
    index: int
    room: int
    cookie: str
    last_id: int = 0
    first_seen: dict = field(default_factory=dict)  # id -> monotonic time of first frame
    duplicates: int = 0
    closes: list = field(default_factory=list)  # (monotonic time, close code)
    opens: list = field(default_factory=list)  # monotonic times of successful handshakes
    refused: list = field(default_factory=list)  # (time, status or exception name)
    errors: list = field(default_factory=list)  # (time, data-error code)
    ws: object = None
    texts: dict = field(default_factory=dict)  # id -> first frame (for senders' latency)


class Swarm:
    def __init__(self, port: int, rooms: dict[int, list[str]], host: str = "127.0.0.1", reconnect=(0.05, 0.5)):
        """rooms: room id -> session cookies, one client per cookie entry."""
        self.port, self.host, self.reconnect = port, host, reconnect
        self.clients = [Client(i, room, cookie) for i, (room, cookie) in
                        enumerate((r, c) for r, cookies in rooms.items() for c in cookies)]
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.stopping = False
        self.tasks = []
        self.sent: list[tuple[int, str, float]] = []  # (room, text, time)
        self.send_failures = 0

    # --- lifecycle -----------------------------------------------------------
    def start(self, timeout=60.0) -> float:
        """Connect every client; returns seconds until all were open."""
        self.thread.start()
        started = time.monotonic()
        for client in self.clients:
            self.tasks.append(asyncio.run_coroutine_threadsafe(self._run(client), self.loop))
        self.wait(lambda: all(c.ws is not None for c in self.clients), timeout, "all clients connected")
        return time.monotonic() - started

    def stop(self):
        self.stopping = True

        async def close_all():
            await asyncio.gather(*(c.ws.close() for c in self.clients if c.ws is not None), return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(close_all(), self.loop).result(30)
        except Exception:
            pass
        for task in self.tasks:
            task.cancel()
        time.sleep(0.2)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def wait(self, predicate, timeout, what):
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for: {what}")
            time.sleep(0.05)

    # --- one client ----------------------------------------------------------
    def _url(self, client):
        return f"ws://{self.host}:{self.port}/ws/rooms/{client.room}/?after={client.last_id}"

    async def _run(self, client: Client):
        while not self.stopping:
            try:
                ws = await connect(
                    self._url(client), origin=f"https://{self.host}:{self.port}",
                    additional_headers={"Cookie": client.cookie, "X-Forwarded-Proto": "https"},
                    open_timeout=20, close_timeout=2, ping_interval=None, max_size=2**20,
                )
            except InvalidStatus as exc:
                client.refused.append((time.monotonic(), exc.response.status_code))
                await asyncio.sleep(random.uniform(*self.reconnect))
                continue
            except (OSError, asyncio.TimeoutError, TimeoutError, ConnectionClosed) as exc:
                client.refused.append((time.monotonic(), type(exc).__name__))
                await asyncio.sleep(random.uniform(*self.reconnect))
                continue
            client.opens.append(time.monotonic())
            client.ws = ws
            try:
                async for frame in ws:
                    self._frame(client, frame)
            except ConnectionClosed:
                pass
            client.closes.append((time.monotonic(), ws.close_code if ws.close_code is not None else 1006))
            if self.stopping:
                return
            await asyncio.sleep(random.uniform(*self.reconnect))

    def _frame(self, client: Client, frame):
        if isinstance(frame, bytes):
            frame = frame.decode()
        now = time.monotonic()
        m = MSG_ID.search(frame)
        if m:
            mid = int(m.group(1))
            if mid in client.first_seen:
                client.duplicates += 1
            else:
                client.first_seen[mid] = now
                client.texts[mid] = frame
            client.last_id = max(client.last_id, mid)
            return
        e = ERROR.search(frame)
        if e:
            client.errors.append((now, e.group(1)))

    # --- sending -------------------------------------------------------------
    def send_from(self, client: Client, text: str) -> bool:
        async def go():
            ws = client.ws
            if ws is None:
                return False
            try:
                await ws.send(json.dumps({"message": text}))
                return True
            except ConnectionClosed:
                return False

        ok = asyncio.run_coroutine_threadsafe(go(), self.loop).result(10)
        if ok:
            self.sent.append((client.room, text, time.monotonic()))
        else:
            self.send_failures += 1
        return ok

    def senders(self):
        """The first client of every room."""
        first = {}
        for c in self.clients:
            first.setdefault(c.room, c)
        return list(first.values())

    def chatter(self, seconds: float, rate: float, tag: str, stop_event: threading.Event | None = None):
        """Each room's sender sends `rate` messages a second for `seconds` (or until stop_event)."""
        senders = self.senders()
        n = 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not (stop_event and stop_event.is_set()):
            for s in senders:
                self.send_from(s, f"{tag} {s.room} #{n}")
            n += 1
            time.sleep(1 / rate)
        return n

    # --- checks --------------------------------------------------------------
    def missing(self, expected: dict[int, set[int]]) -> dict[int, set[int]]:
        """client index -> stored ids of its room it has not shown."""
        out = {}
        for c in self.clients:
            gap = expected.get(c.room, set()) - set(c.first_seen)
            if gap:
                out[c.index] = gap
        return out

    def duplicates(self) -> int:
        return sum(c.duplicates for c in self.clients)

    def close_codes(self) -> dict[int, int]:
        codes = {}
        for c in self.clients:
            for _, code in c.closes:
                codes[code] = codes.get(code, 0) + 1
        return codes


def percentile(values, p):
    if not values:
        return None
    values = sorted(values)
    k = max(0, min(len(values) - 1, round(p / 100 * (len(values) - 1))))
    return values[k]


def summary_ms(values):
    return {"n": len(values), "p50_ms": round(1000 * percentile(values, 50), 1) if values else None,
            "p99_ms": round(1000 * percentile(values, 99), 1) if values else None,
            "max_ms": round(1000 * max(values), 1) if values else None,
            "mean_ms": round(1000 * statistics.fmean(values), 1) if values else None}
