"""Hundreds of chat clients on real websockets, behaving like the room page.

Each client connects to /ws/rooms/<id>/?after=<cursor>, shows every message
frame the way room.js does (tests/harness/chat_client.Shown: the cursor is the
highest seq below which it shows every message, a message already shown is
dropped), records when it first showed each message, and on any close - or any
failed connect, whatever the exception - reconnects after a short jittered
delay, as htmx-ext-ws does. The swarm runs on its own asyncio loop in a
thread so a test can stop Redis, kill workers or send signals while it runs.

What the server must never do, counted per client:
* `duplicates`: a message sent twice on one connection, or replayed although
  it is at or below the cursor the client connected with;
* a stored message never shown (`missing`, against the database).
A replay after a reconnect may legitimately resend a message the client got
*above* its cursor (it arrived before an older one); the page drops it, and
`resent` counts it.

Every timeout (`wait`) raises with a diagnosis: the clients still waited for,
their connection history, close codes, refusals, errors, whether their task
is still alive, and the server's workers (alive, sockets held, log).
"""
from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import re
import statistics
import threading
import time
from dataclasses import dataclass, field

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.harness.chat_client import Shown

ERROR = re.compile(r'data-error="([a-z_]+)"')


@dataclass
class Client:
    index: int
    room: int
    cookie: str
    shown: Shown = field(default_factory=Shown)
    first_seen: dict = field(default_factory=dict)  # message id -> monotonic time it was first shown
    texts: dict = field(default_factory=dict)  # message id -> its frame (for senders' latency)
    duplicates: int = 0
    resent: int = 0
    late: int = 0  # frames whose seq is below one this connection already got (published out of order)
    closes: list = field(default_factory=list)  # (monotonic time, close code)
    opens: list = field(default_factory=list)  # (monotonic time, cursor it connected with)
    refused: list = field(default_factory=list)  # (time, status or exception)
    errors: list = field(default_factory=list)  # (time, data-error code)
    ws: object = None
    local_port: int | None = None  # of the open connection: which worker holds it (Swarm.placement)
    conn: set = field(default_factory=set)  # ids sent on the current connection
    conn_after: int = 0
    conn_top: int = 0

    @property
    def is_open(self) -> bool:
        return self.ws is not None and self.ws.state.name == "OPEN"


class Swarm:
    def __init__(self, port: int, rooms: dict[int, list[str]], host: str = "127.0.0.1", reconnect=(0.05, 0.5),
                 server=None):
        """rooms: room id -> session cookies, one client per cookie entry.
        server: the Gunicorn (tests/harness/services.py) for placement and diagnoses."""
        self.port, self.host, self.reconnect, self.server = port, host, reconnect, server
        # Interleaved (room A, B, C, A, ...): clients that connect at the same
        # moment (and tend to land on the same worker) belong to different rooms.
        interleaved = [(r, c) for group in itertools.zip_longest(*([(r, c) for c in cookies] for r, cookies in rooms.items()))
                       for r, c in (pair for pair in group if pair is not None)]
        self.clients = [Client(i, room, cookie) for i, (room, cookie) in enumerate(interleaved)]
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.stopping = False
        self.tasks = []
        self.sent: list[tuple[int, str, float]] = []  # (room, text, time)
        self.send_failures = 0
        self.rounds: list[dict] = []  # chatter: per round, room -> workers its senders sent through

    # --- lifecycle -----------------------------------------------------------
    def start(self, timeout=60.0) -> float:
        """Connect every client; returns seconds until all were open."""
        self.thread.start()
        started = time.monotonic()
        for client in self.clients:
            self.tasks.append(asyncio.run_coroutine_threadsafe(self._run(client), self.loop))
        self.wait(lambda: all(c.ws is not None for c in self.clients), timeout, "all clients connected",
                  pending=lambda: [c for c in self.clients if c.ws is None])
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

    def wait(self, predicate, timeout, what, pending=None):
        """Poll `predicate`; on timeout raise with a diagnosis of `pending()`
        (the clients not there yet; all clients if not given)."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for: {what}\n"
                                     + self.diagnose(pending() if pending else self.clients))
            time.sleep(0.05)

    # --- one client ----------------------------------------------------------
    def _url(self, client):
        return f"ws://{self.host}:{self.port}/ws/rooms/{client.room}/?after={client.shown.after}"

    async def _run(self, client: Client):
        while not self.stopping:
            after = client.shown.after
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
            except Exception as exc:  # noqa: BLE001 - like the page: any failed connect is retried
                # Not only OSError/timeouts: a worker that is shutting down can
                # drop a connection it accepted before the handshake is answered
                # (InvalidMessage: "did not receive a valid HTTP response").
                client.refused.append((time.monotonic(), f"{type(exc).__name__}: {exc}"[:120]))
                await asyncio.sleep(random.uniform(*self.reconnect))
                continue
            client.conn, client.conn_after, client.conn_top = set(), after, after
            client.local_port = ws.local_address[1]
            client.opens.append((time.monotonic(), after))
            client.ws = ws
            try:
                async for frame in ws:
                    self._frame(client, frame)
            except ConnectionClosed:
                pass
            except Exception as exc:  # noqa: BLE001 - a bug in this client must show, not end the client
                client.errors.append((time.monotonic(), f"client: {type(exc).__name__}: {exc}"[:120]))
            client.closes.append((time.monotonic(), ws.close_code if ws.close_code is not None else 1006))
            client.local_port = None
            if self.stopping:
                return
            await asyncio.sleep(random.uniform(*self.reconnect))

    def _frame(self, client: Client, frame):
        if isinstance(frame, bytes):
            frame = frame.decode()
        now = time.monotonic()
        parsed = Shown.parse(frame)
        if parsed is not None:
            message_id, seq = parsed
            if message_id in client.conn or seq <= client.conn_after:
                client.duplicates += 1  # the server's bookkeeping failed
            elif message_id in client.first_seen:
                client.resent += 1  # shown before, above the cursor: the page drops it
            if seq < client.conn_top:
                client.late += 1
            client.conn_top = max(client.conn_top, seq)
            client.conn.add(message_id)
            if client.shown.apply(frame) is not None:
                client.first_seen[message_id] = now
                client.texts[message_id] = frame
            return
        if client.shown.apply(frame) is None:
            e = ERROR.search(frame)
            if e:
                client.errors.append((now, e.group(1)))

    # --- where the sockets are ------------------------------------------------
    def placement(self) -> dict[int, int]:
        """client index -> pid of the worker holding its open connection (read
        from /proc: the server side of each TCP connection and the workers' fds)."""
        if self.server is None:
            return {}
        wanted = {c.local_port: c.index for c in self.clients if c.local_port is not None and c.is_open}
        inode_of = {}
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with open(table) as fh:
                for row in fh.readlines()[1:]:
                    cols = row.split()
                    local, remote = int(cols[1].rsplit(":", 1)[1], 16), int(cols[2].rsplit(":", 1)[1], 16)
                    if local == self.port and remote in wanted:
                        inode_of[f"socket:[{cols[9]}]"] = wanted[remote]
        out = {}
        for pid in self.server.worker_pids():
            try:
                fds = os.listdir(f"/proc/{pid}/fd")
            except OSError:
                continue
            for fd in fds:
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if target in inode_of:
                    out[inode_of[target]] = pid
        return out

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

    def spread(self, per_worker: int = 2, timeout: float = 30.0) -> int:
        """Make sure every room has `per_worker` open clients on each worker:
        the kernel hands a new connection to whichever worker accepts first,
        so a burst of connects can all land on one. Clients of a room that
        lacks a worker are closed (they reconnect, like a page) until it has.
        Returns how many were closed."""
        closed = 0
        deadline = time.monotonic() + timeout
        workers = self.server.worker_pids()
        while True:
            where = self.placement()
            short = {}
            for room in {c.room for c in self.clients}:
                for pid in workers:
                    if sum(1 for c in self.clients if c.room == room and where.get(c.index) == pid) < per_worker:
                        short[room] = pid
            if not short:
                return closed
            assert time.monotonic() < deadline, (f"rooms {short} still lack clients on those workers after {timeout}s\n"
                                                 + self.server_state(where))
            for room in short:
                movable = [c for c in self.clients if c.room == room and c.index in where][:per_worker * 2]
                for c in movable:
                    asyncio.run_coroutine_threadsafe(c.ws.close(), self.loop)
                    closed += 1
            time.sleep(1.0)
            self.wait(lambda: all(c.is_open for c in self.clients), 30, "clients closed by spread() back",
                      pending=lambda: [c for c in self.clients if not c.is_open])

    def senders(self, per_worker: int = 2) -> list[Client]:
        """Per room, `per_worker` open clients on each worker (distinct sessions
        where possible), chosen by where their sockets are now: several senders
        per room on *different* workers, so two workers write one room at once.
        Raises if a room has no client on some worker."""
        where = self.placement()
        workers = sorted(set(where.values()))
        assert len(workers) >= 2, f"the sockets are on {len(workers)} worker(s): {workers}"
        chosen = []
        for room in sorted({c.room for c in self.clients}):
            cookies_used = set()
            for pid in workers:
                here = [c for c in self.clients if c.room == room and where.get(c.index) == pid]
                here.sort(key=lambda c: c.cookie in cookies_used)
                assert len(here) >= per_worker, f"room {room}: {len(here)} client(s) on worker {pid}"
                for c in here[:per_worker]:
                    cookies_used.add(c.cookie)
                    chosen.append(c)
        return chosen

    def chatter(self, seconds: float, interval: float, tag: str, stop_event: threading.Event | None = None,
                per_worker: int = 2, reselect: threading.Event | None = None) -> int:
        """Every `interval` seconds, every sender of every room sends at the
        same moment (senders(): `per_worker` per room on each worker), until
        `seconds` pass or stop_event is set. Setting `reselect` picks senders
        again by where the sockets are now (after a restart moved them).
        Returns the number of rounds."""
        senders = self.senders(per_worker)
        n = 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not (stop_event and stop_event.is_set()):
            if reselect is not None and reselect.is_set():
                try:
                    senders = self.senders(per_worker)
                    reselect.clear()
                except AssertionError:
                    pass  # not everybody is back yet: keep the old senders this round
            where = self.placement()
            round_workers = {}
            for s in senders:
                if where.get(s.index) is not None:
                    round_workers.setdefault(s.room, set()).add(where[s.index])
            self.rounds.append(round_workers)
            asyncio.run_coroutine_threadsafe(self._send_all(senders, f"{tag} #{n}"), self.loop).result(10)
            n += 1
            time.sleep(interval)
        return n

    async def _send_all(self, senders, label):
        async def one(s):
            ws = s.ws
            try:
                await ws.send(json.dumps({"message": f"{label} from {s.index} in {s.room}"}))
            except Exception:  # noqa: BLE001 - closed by the fault under test
                return False
            self.sent.append((s.room, label, time.monotonic()))
            return True

        results = await asyncio.gather(*(one(s) for s in senders))
        self.send_failures += results.count(False)

    def concurrent_rounds(self) -> int:
        """Rounds in which every room's senders sent through two workers or more."""
        return sum(1 for r in self.rounds if r and all(len(w) >= 2 for w in r.values()))

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

    def resent(self) -> int:
        return sum(c.resent for c in self.clients)

    def late(self) -> int:
        return sum(c.late for c in self.clients)

    def close_codes(self, since: float = 0.0) -> dict[int, int]:
        codes = {}
        for c in self.clients:
            for t, code in c.closes:
                if t >= since:
                    codes[code] = codes.get(code, 0) + 1
        return codes

    # --- diagnosis -------------------------------------------------------------
    def diagnose(self, clients, limit: int = 12) -> str:
        now = time.monotonic()
        where = {}
        try:
            where = self.placement()
        except Exception as exc:  # noqa: BLE001 - a diagnosis must not fail
            where = {"error": repr(exc)}
        lines = [f"{len(clients)} of {len(self.clients)} clients not there; the first {min(limit, len(clients))}:"]
        for c in clients[:limit]:
            task = self.tasks[c.index] if c.index < len(self.tasks) else None
            if task is None:
                state = "no task"
            elif not task.done():
                state = "running"
            elif task.cancelled():
                state = "cancelled"
            else:
                state = f"ENDED: {task.exception()!r}"
            ws = "none" if c.ws is None else c.ws.state.name
            lines.append(
                f"  client {c.index} room {c.room}: task {state}; socket {ws} on worker {where.get(c.index)}; "
                f"cursor {c.shown.after} (+{len(c.shown.early)} early); shown {len(c.first_seen)}; "
                f"opens (s ago, after=) {[(round(now - t, 2), a) for t, a in c.opens[-3:]]}; "
                f"closes (s ago, code) {[(round(now - t, 2), code) for t, code in c.closes[-3:]]}; "
                f"refused {[(round(now - t, 2), r) for t, r in c.refused[-3:]]} ({len(c.refused)} in all); "
                f"errors {[(round(now - t, 2), e) for t, e in c.errors[-3:]]}")
        lines.append(self.server_state(where))
        return "\n".join(lines)

    def server_state(self, where=None) -> str:
        if self.server is None:
            return "server: unknown (no server given to the Swarm)"
        master = self.server.proc
        lines = [f"server: master {master.pid} {'alive' if master.poll() is None else f'exited {master.returncode}'}"]
        held = {}
        for pid in (where or {}).values():
            held[pid] = held.get(pid, 0) + 1
        for pid in self.server.worker_pids():
            lines.append(f"  worker {pid}: {'alive' if os.path.exists(f'/proc/{pid}') else 'gone'}, "
                         f"holds {held.get(pid, 0)} of the swarm's open sockets")
        try:
            log = self.server.log().splitlines()
            notable = [ln for ln in log if re.search(r"\[(CRITICAL|ERROR|WARNING)\]|Booting worker|Worker exiting|"
                                                     r"Handling signal|WORKER TIMEOUT|Traceback", ln)]
            lines.append("  log: " + "\n  log: ".join(notable[-12:]))
        except Exception as exc:  # noqa: BLE001
            lines.append(f"  log unreadable: {exc!r}")
        return "\n".join(lines)


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
