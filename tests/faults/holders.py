"""Websocket clients that stay open and say how they ended.

Unlike the swarm (tests/faults/swarm.py) these never reconnect: each records
every frame, the error codes of error frames, the close code and the
wall-clock time (time.time(), comparable with another process's) the server
closed it. All connections live on one event loop in a daemon thread.

Whether a handshake was really accepted is read from the first frame: the
rooms used here hold one message and the clients connect with ?after=0, so an
accepted socket is sent that message at once, and a refused one an error
frame and a close.
"""
from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from dataclasses import dataclass, field

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

ERROR = re.compile(r'data-error="([a-z_]+)"')
MSG = re.compile(r'data-msg-id="(\d+)"')


@dataclass
class Conn:
    port: int
    room: int
    cookie: str
    source: str
    status: int | str | None = None  # 101, an HTTP status, or an exception name
    accepted: bool | None = None
    frames: list = field(default_factory=list)
    errors: list = field(default_factory=list)
    close_code: int | None = None
    closed_at: float | None = None  # time.time()
    local_port: int | None = None
    ws: object = None
    first: asyncio.Event | None = None

    @property
    def open(self) -> bool:
        return self.ws is not None and self.close_code is None

    @property
    def ended(self) -> tuple[str | None, int | None]:
        return (self.errors[-1] if self.errors else None), self.close_code


class Holders:
    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.conns: list[Conn] = []

    def _run(self, coro, timeout=60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def open(self, specs, concurrency: int = 16, timeout: float = 60) -> list[Conn]:
        """specs: (port, room, cookie, source address). Opens them (`concurrency`
        at a time) and waits for each one's first frame or close."""
        conns = [Conn(port, room, cookie, source) for port, room, cookie, source in specs]
        self.conns += conns

        async def all_of():
            gate = asyncio.Semaphore(concurrency)

            async def one(c):
                async with gate:
                    await self._open(c)

            await asyncio.gather(*(one(c) for c in conns))

        self._run(all_of(), timeout)
        return conns

    async def _open(self, c: Conn):
        c.first = asyncio.Event()
        try:
            ws = await connect(
                f"ws://127.0.0.1:{c.port}/ws/rooms/{c.room}/?after=0", origin=f"https://127.0.0.1:{c.port}",
                additional_headers={"Cookie": c.cookie, "X-Forwarded-Proto": "https"},
                open_timeout=20, close_timeout=2, ping_interval=None, local_addr=(c.source, 0))
        except InvalidStatus as exc:
            c.status, c.accepted = exc.response.status_code, False
            return
        except Exception as exc:  # noqa: BLE001 - recorded, the test decides
            c.status, c.accepted = type(exc).__name__, False
            return
        c.status, c.ws, c.local_port = 101, ws, ws.local_address[1]
        asyncio.get_running_loop().create_task(self._read(c))
        try:
            await asyncio.wait_for(c.first.wait(), 20)
        except asyncio.TimeoutError:
            pass
        c.accepted = bool(c.frames) and MSG.search(c.frames[0]) is not None

    async def _read(self, c: Conn):
        try:
            async for frame in c.ws:
                c.frames.append(frame)
                m = ERROR.search(frame)
                if m:
                    c.errors.append(m.group(1))
                c.first.set()
        except ConnectionClosed:
            pass
        c.close_code = c.ws.close_code if c.ws.close_code is not None else 1006
        c.closed_at = time.time()
        c.first.set()

    def send(self, c: Conn, text: str) -> bool:
        async def go():
            try:
                await c.ws.send(json.dumps({"message": text}))
                return True
            except ConnectionClosed:
                return False

        return self._run(go(), 10)

    def close(self, c: Conn):
        async def go():
            if c.ws is not None:
                await c.ws.close()

        self._run(go(), 10)

    def wait(self, predicate, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            time.sleep(0.02)

    def stop(self):
        async def close_all():
            await asyncio.gather(*(c.ws.close() for c in self.conns if c.ws is not None), return_exceptions=True)

        try:
            self._run(close_all(), 30)
        except Exception:  # noqa: BLE001
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
