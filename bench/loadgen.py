"""The load generator: a separate process holding many real websocket clients.

Run by the benchmark as `python -m bench.loadgen`; it reads one JSON command
per line on stdin and answers one JSON line on stdout:

  {"cmd": "connect", "base": "ws://127.0.0.1:PORT", "origin": "...",
   "clients": [[cid, room_id, session_key], ...], "concurrency": 64, "timeout": 120}
      -> {"connected": [cid, ...], "failed": {reason: n}, "seconds": s}
  {"cmd": "run", "step": s, "rate": per-client msgs/s, "duration": s, "drain": s,
   "room_sizes": {room_id: members}, "senders": [cid, ...] | null,
   "min_sends": n (each sender sends at least n), "lat_cap": n | null (keep a uniform sample of n latencies)}
      -> totals of this process for step s (sent, expected deliveries, unique
         deliveries, duplicates, latencies in microseconds, errors, CPU seconds)
  {"cmd": "churn", "base": ..., "origin": ..., "clients": [[cid, room_id, session_key], ...],
   "rate": reconnects/s, "duration": s, "hold": s, "concurrency": n}
      -> {"started", "completed", "failed": {reason: n}, "closed_by_server", "skipped", "seconds"}
         (transient sockets: connect, read for `hold` s, close; never kept in the pool)
  {"cmd": "close"} -> {"closed": n} and the process exits

Every message text is `bm <step> <sender cid> <seq> <monotonic ns at send>`:
CLOCK_MONOTONIC is one clock for every process on the machine, so a receiver
in another generator process measures send -> receive latency directly. The
generator reads that text, not the frame's data-msg-id/data-seq: its clients
never reconnect, so they need no cursor (tests/harness/chat_client.Shown).
Only 127.0.0.1 is ever contacted (the coordinator passes the base URL).
"""
from __future__ import annotations

import asyncio
import json
import random
import resource
import sys
import time
from collections import Counter

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

MARK = '<p class="body">bm '


class Client:
    __slots__ = ("cid", "room", "session", "ws", "seen", "task")

    def __init__(self, cid, room, session):
        self.cid, self.room, self.session = cid, room, session
        self.ws = None
        self.seen = {}  # step -> set of (sender, seq): duplicates are per receiver
        self.task = None


class Generator:
    def __init__(self):
        self.clients: dict[int, Client] = {}
        self.stats = {}  # step -> {"unique", "dup", "lat"}
        self.reported = set()
        self.late = 0
        self.errors = Counter()
        self.window_open = False
        self.window_deliveries = 0
        self.closed_by_server = 0
        self.lat_cap = None  # per step (cmd_run's lat_cap)
        self.rng = random.Random()
        self.compression = None

    # --- receiving -----------------------------------------------------------
    def on_frame(self, client: Client, frame):
        now = time.monotonic_ns()
        if not isinstance(frame, str):
            self.errors["binary_frame"] += 1
            return
        i = frame.find(MARK)
        if i < 0:
            if 'data-upto="' in frame:  # a cursor frame (a replay cut short): not a delivery, not an error
                return
            j = frame.find('data-error="')
            if j >= 0:
                self.errors[frame[j + 12:frame.find('"', j + 12)]] += 1
            else:
                self.errors["unknown_frame"] += 1
            return
        j = frame.find("</p>", i)
        try:
            step, sender, seq, sent_ns = map(int, frame[i + len(MARK):j].split())
        except ValueError:
            self.errors["unparsable_frame"] += 1
            return
        if self.window_open:
            self.window_deliveries += 1
        if step in self.reported:
            self.late += 1
            return
        seen = client.seen.get(step)
        if seen is None:
            seen = client.seen[step] = set()
        st = self.stats.get(step)
        if st is None:
            st = self.stats[step] = {"unique": 0, "dup": 0, "lat": []}
        key = (sender, seq)
        if key in seen:
            st["dup"] += 1
            return
        seen.add(key)
        st["unique"] += 1
        lat = st["lat"]
        if self.lat_cap is None or len(lat) < self.lat_cap:
            lat.append((now - sent_ns) // 1000)
        else:  # reservoir sampling: a uniform sample of a long step's latencies in bounded memory
            k = self.rng.randrange(st["unique"])
            if k < self.lat_cap:
                lat[k] = (now - sent_ns) // 1000

    async def reader(self, client: Client):
        try:
            async for frame in client.ws:
                self.on_frame(client, frame)
        except ConnectionClosed:
            pass
        except Exception:  # noqa: BLE001 - counted, never fatal to the generator
            self.errors["reader_exception"] += 1
        self.closed_by_server += 1

    # --- commands ------------------------------------------------------------
    async def cmd_connect(self, base, origin, clients, concurrency=64, timeout=120.0):
        started = time.monotonic()
        deadline = started + timeout
        gate = asyncio.Semaphore(concurrency)
        failed = Counter()
        connected = []

        async def one(cid, room, session):
            async with gate:
                left = deadline - time.monotonic()
                if left <= 0:
                    failed["deadline"] += 1
                    return
                client = Client(cid, room, session)
                try:
                    client.ws = await asyncio.wait_for(connect(
                        f"{base}/ws/rooms/{room}/", origin=origin,
                        additional_headers={"Cookie": f"sessionid={session}", "X-Forwarded-Proto": "https"},
                        ping_interval=None,  # the server pings (20 s); pongs are automatic
                        compression=self.compression, open_timeout=min(30, left), close_timeout=2,
                        max_queue=None,
                    ), min(30, left) + 1)
                except Exception as exc:  # noqa: BLE001
                    failed[type(exc).__name__] += 1
                    return
                self.clients[cid] = client
                client.task = asyncio.create_task(self.reader(client))
                connected.append(cid)

        await asyncio.gather(*(one(*c) for c in clients))
        return {"connected": connected, "failed": dict(failed), "seconds": time.monotonic() - started}

    async def cmd_run(self, step, rate, duration, drain, room_sizes, senders=None, min_sends=0, lat_cap=None):
        room_sizes = {int(k): v for k, v in room_sizes.items()}
        self.lat_cap = lat_cap
        usage0 = resource.getrusage(resource.RUSAGE_SELF)
        start = time.monotonic()
        end = start + duration
        errors0 = Counter(self.errors)
        sent = Counter()
        send_failed = Counter()

        async def sender(client: Client):
            rng = random.Random()
            seq = 0
            at = start
            while True:  # a Poisson process: exponential gaps, bounded by the step's end
                at += rng.expovariate(rate)
                if at >= end:
                    if seq >= min_sends:
                        break
                    at = end  # a probe: at least min_sends messages even if the schedule ended first
                await asyncio.sleep(max(0.0, at - time.monotonic()))
                text = f"bm {step} {client.cid} {seq} {time.monotonic_ns()}"
                try:
                    await client.ws.send('{"message": "%s"}' % text)
                except ConnectionClosed:
                    send_failed["closed"] += 1
                    break
                seq += 1
            sent[client.cid] = seq

        chosen = [self.clients[c] for c in senders if c in self.clients] if senders is not None else list(self.clients.values())
        self.window_deliveries = 0
        self.window_open = True
        await asyncio.gather(*(sender(c) for c in chosen))
        self.window_open = False
        window = time.monotonic() - start
        window_deliveries = self.window_deliveries
        await asyncio.sleep(drain)
        self.reported.add(step)
        st = self.stats.pop(step, {"unique": 0, "dup": 0, "lat": []})
        for client in self.clients.values():
            client.seen.pop(step, None)
        usage1 = resource.getrusage(resource.RUSAGE_SELF)
        expected = sum(n * room_sizes.get(self.clients[cid].room, 0) for cid, n in sent.items())
        return {
            "step": step, "sent": sum(sent.values()), "expected": expected, "unique": st["unique"], "dup": st["dup"],
            "lat_us": st["lat"], "window_s": window, "window_deliveries": window_deliveries,
            "errors": dict(Counter(self.errors) - errors0), "send_failed": dict(send_failed),
            "cpu_s": (usage1.ru_utime + usage1.ru_stime) - (usage0.ru_utime + usage0.ru_stime),
            "open": sum(1 for c in self.clients.values() if c.task and not c.task.done()),
        }

    async def cmd_churn(self, base, origin, clients, rate, duration, hold=1.0, concurrency=256, timeout=30.0):
        """Connect/disconnect churn: `rate` new sockets per second for `duration` s, each held `hold` s.

        Sessions are taken round robin from `clients` (more sessions than sockets open at once,
        so no user exceeds the per-user socket limit). A socket counts as completed once it
        opened, stayed `hold` s and was closed by us; refused handshakes count by exception type.
        """
        started = time.monotonic()
        end = started + duration
        gate = asyncio.Semaphore(concurrency)
        failed = Counter()
        counts = Counter()
        tasks = set()

        async def one(cid, room, session):
            try:
                ws = await asyncio.wait_for(connect(
                    f"{base}/ws/rooms/{room}/", origin=origin,
                    additional_headers={"Cookie": f"sessionid={session}", "X-Forwarded-Proto": "https"},
                    ping_interval=None, compression=self.compression, open_timeout=timeout, close_timeout=2,
                    max_queue=None), timeout + 1)
            except Exception as exc:  # noqa: BLE001 - counted
                failed[type(exc).__name__] += 1
                gate.release()
                return
            try:
                closed_early = False
                try:
                    async with asyncio.timeout(hold):
                        async for _frame in ws:  # the replay and any traffic: read, never kept
                            pass
                    closed_early = True  # the server closed it before `hold` ran out
                except TimeoutError:
                    pass
                await asyncio.wait_for(ws.close(), 5)
                counts["closed_by_server" if closed_early else "completed"] += 1
            except Exception as exc:  # noqa: BLE001 - counted
                failed[f"close_{type(exc).__name__}"] += 1
            finally:
                gate.release()

        at = started
        n = 0
        while True:  # evenly spaced starts at `rate`/s (a reconnect: a socket goes, another comes)
            at += 1.0 / rate
            if at >= end:
                break
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            if gate.locked():  # too many still connecting/open: counted, never queued without bound
                counts["skipped"] += 1
                continue
            await gate.acquire()
            cid, room, session = clients[n % len(clients)]
            n += 1
            counts["started"] += 1
            task = asyncio.create_task(one(cid, room, session))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            _done, pending = await asyncio.wait(list(tasks), timeout=hold + timeout + 10)
            for task in pending:  # bounded: whatever is still hanging is counted and dropped
                task.cancel()
                failed["unfinished"] += 1
        return {"started": counts["started"], "completed": counts["completed"], "failed": dict(failed),
                "closed_by_server": counts["closed_by_server"], "skipped": counts["skipped"],
                "seconds": time.monotonic() - started}

    async def cmd_close(self):
        async def one(c):
            try:
                await asyncio.wait_for(c.ws.close(), 3)
            except Exception:  # noqa: BLE001
                pass

        gate = asyncio.Semaphore(256)

        async def gated(c):
            async with gate:
                await one(c)

        await asyncio.wait_for(asyncio.gather(*(gated(c) for c in self.clients.values())), 60)
        return {"closed": len(self.clients)}


async def main(compression):
    gen = Generator()
    gen.compression = compression
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 26)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = sys.stdout
    while True:
        line = await reader.readline()
        if not line:
            return
        command = json.loads(line)
        name = command.pop("cmd")
        try:
            if name == "close":
                try:
                    result = await gen.cmd_close()
                except asyncio.TimeoutError:
                    result = {"closed": "timeout"}
            else:
                result = await getattr(gen, f"cmd_{name}")(**command)
        except Exception as exc:  # noqa: BLE001 - reported to the coordinator
            result = {"error": f"{type(exc).__name__}: {exc}"}
        out.write(json.dumps(result) + "\n")
        out.flush()
        if name == "close":
            return


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--compression", choices=("deflate", "none"), default="deflate")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        import uvloop
    except ImportError:
        uvloop = None
    (uvloop.run if uvloop else asyncio.run)(main(None if args.compression == "none" else "deflate"))
