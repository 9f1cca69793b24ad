"""Metrics on the real stack: every counter equals what the test did, exactly.

A harness gunicorn (2 Uvicorn workers, DEBUG=False, PostgreSQL shared with
the stack, its own Redis) with METRICS_TOKEN and METRICS_PORT, small limits
so that each refusal is cheap to cause, and no periodic resync (so every
resync pass comes from the Redis restart below). A scripted scenario:

1. four sockets in one room, each from its own loopback address;
2. one handshake of each refusal (path tricks, an unknown websocket path, a
   foreign Host, a foreign Origin, anonymous, an unknown room), and six
   anonymous ones from one address over its limit of 4 a minute;
3. five messages from one socket (each waited for on all four), one frame
   of each bad kind, then a burst of 15 from another socket (burst 12);
   then one user over its socket limit (2) and, from two sockets, one
   message over its message budget (20, over all its sockets);
4. three logins from one address (limit 2 a minute);
5. Redis stopped, two messages sent (stored; only the sender sees them),
   Redis started: the resync sends them to the three others;
6. one more message, nothing scraped for 3 s (the workers' once-a-second
   flush, not a scrape, writes its counts), then the worker holding a socket
   SIGKILLed: its counters stay in the totals,
   its sockets leave the gauge and its pid leaves the process metrics; its
   clients reconnect to the replacement worker, one more message.

After each step the test scrapes, through both ways in (the app port with
the bearer token, METRICS_PORT without), until every chat_* sample equals
its expectation, then once more after a flush interval: no count may come
late or twice. The resync passes are checked against the workers' own log
lines ("resync: N room(s), M missed frame(s) sent", logged at DEBUG for
every pass).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import signal
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import ConnectionClosed

from tests.contract import ws_client
from tests.faults import results
from tests.faults.conftest import cookie_header, log_problems
from tests.faults.test_limits import Browser, handshake
from tests.harness import chat_client as cc
from tests.harness.services import free_port
from tests.harness.sockets import server_pid

pytestmark = pytest.mark.integration

TOKEN = secrets.token_urlsafe(32)
BURST = 12
HANDSHAKE_LIMIT = 4
LOGIN_LIMIT = 2
SOCKETS_PER_USER = 2
USER_BURST = 20  # messages per user over all sockets (refills at 0.1/s: nothing refills during the test)
MAX_LENGTH = 200
SETTLE = 10.0  # seconds to wait for a scrape to show what was done (counts are flushed every second)
FLUSH_SECONDS = 1.0  # app/observability/metrics.py
RESYNC_LINE = re.compile(r"resync: (\d+) room\(s\), (\d+) missed frame\(s\) sent")


@pytest.fixture(scope="module")
def metered(spawn):
    gunicorn = spawn(METRICS_TOKEN=TOKEN, METRICS_PORT=free_port(), LOG_LEVEL="debug",
                     CHAT_RATE_PER_SECOND="0.1", CHAT_RATE_BURST=str(BURST), CHAT_MAX_MESSAGE_LENGTH=str(MAX_LENGTH),
                     CHAT_ADDRESS_HANDSHAKES_PER_MINUTE=str(HANDSHAKE_LIMIT),
                     CHAT_ADDRESS_LOGINS_PER_MINUTE=str(LOGIN_LIMIT), CHAT_RESYNC_INTERVAL="0",
                     CHAT_MAX_SOCKETS_PER_USER=str(SOCKETS_PER_USER), CHAT_USER_RATE_PER_SECOND="0.1",
                     CHAT_USER_RATE_BURST=str(USER_BURST))
    gunicorn.metrics_port = int(gunicorn.env["METRICS_PORT"])
    return gunicorn


# --- scraping ----------------------------------------------------------------------------------

class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def get(port: int, path: str = "/metrics", headers: dict | None = None) -> tuple[int, str]:
    """Status and body of one GET (a scraper's: plain HTTP to an address, no redirect followed)."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Host": "10.0.0.7:9999", **(headers or {})})
    try:
        with urllib.request.build_opener(_NoRedirect).open(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def parse(text: str) -> dict[tuple, float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape(gunicorn, way: str) -> dict[tuple, float]:
    if way == "token":
        status, text = get(gunicorn.port, headers={"Authorization": f"Bearer {TOKEN}"})
    else:
        status, text = get(gunicorn.metrics_port)
    assert status == 200, (way, status, text[:300])
    return parse(text)


def counted(samples: dict) -> dict:
    """The chat's samples a test can predict exactly: all but the histogram's
    buckets and sum (latencies), with the count kept."""
    return {k: v for k, v in samples.items() if k[0].startswith("chat_") and not k[0].startswith(
        ("chat_delivery_seconds_bucket", "chat_delivery_seconds_sum", "chat_delivery_seconds_created"))}


class Expected:
    """Every chat_* sample the app exports, and what it must be.

    Resync passes are not the test's to schedule (one per burst of Redis
    reconnects in each worker, and a pooled connection may reconnect later,
    when next used): their number and the frames they sent come from the
    workers' own log lines (`from_log`). A frame a pass sends before its live
    copy arrives is delivered once, by the pass, so it is not a live delivery."""

    def __init__(self, first: dict):
        self.values = {k: 0.0 for k in counted(first)}
        assert self.values, "no chat_ metrics exported"
        self.live_copies = 0  # copies the test expects to arrive by the live fan-out

    def add(self, name: str, amount: float = 1, **labels):
        key = (name, tuple(sorted(labels.items())))
        assert key in self.values, f"{key} is not exported"
        self.values[key] += amount

    def handshake(self, outcome, n=1):
        self.add("chat_websocket_handshakes_total", n, outcome=outcome)

    def rejected(self, reason, n=1):
        self.add("chat_messages_rejected_total", n, reason=reason)

    def limited(self, limit, n=1):
        self.add("chat_rate_limited_total", n, limit=limit)

    def live(self, messages: int, members: int):
        """`messages` stored and fanned out live to `members` sockets each."""
        self.add("chat_messages_stored_total", messages)
        self.add("chat_deliveries_total", messages * members)
        self.live_copies += messages * members

    def from_log(self, gunicorn, missed_by_design: int):
        """Resync passes and frames as the workers logged them; `missed_by_design`:
        the frames the test made the resync send (the rest raced a live copy)."""
        passes = resync_lines(gunicorn)
        sent = sum(frames for _, frames in passes)
        self.values[("chat_resync_runs_total", ())] = len(passes)
        self.values[("chat_resync_frames_total", ())] = sent
        self.values[("chat_delivery_seconds_count", ())] = self.live_copies - (sent - missed_by_design)


def settle(gunicorn, expected: Expected, what: str, missed_by_design: int = 0, ways=("token", "port")) -> dict:
    """Scrape until each way in shows exactly `expected`, then once more a flush
    interval later (nothing late, nothing twice). Returns the last scrape."""
    for way in ways:
        deadline = time.monotonic() + SETTLE
        while True:
            expected.from_log(gunicorn, missed_by_design)
            got = scrape(gunicorn, way)
            diff = {k: (got.get(k), v) for k, v in expected.values.items() if got.get(k) != v}
            extra = set(counted(got)) - set(expected.values)
            if not diff and not extra:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} ({way}): (got, expected) {diff}; unexpected samples {extra}\n"
                                     + gunicorn.log()[-3000:])
            time.sleep(0.2)
    time.sleep(1.5 * FLUSH_SECONDS)
    expected.from_log(gunicorn, missed_by_design)
    again = scrape(gunicorn, "port")
    late = {k: (again.get(k), v) for k, v in expected.values.items() if again.get(k) != v}
    assert not late, f"{what}: counted late or twice: (got, expected) {late}"
    return again


# --- clients -------------------------------------------------------------------------------------

class Client:
    """A room page's socket from its own loopback address. Like the page, it
    connects again when the server answers the handshake with an error frame
    and close 1013 (after a Redis restart the handshake limit's first command
    on a stale pooled connection fails: counted as an `unavailable` handshake)."""

    def __init__(self, gunicorn, user, room: int, source: str, expected: "Expected", after: int = 0):
        self.user, self.source, self.room = user, source, room
        self.frames: list[str] = []
        for _ in range(5):
            self.ws = ws_client.connect(
                f"ws://127.0.0.1:{gunicorn.port}/ws/rooms/{room}/?after={after}",
                origin=f"https://127.0.0.1:{gunicorn.port}",
                additional_headers={"Cookie": cookie_header(user), "X-Forwarded-Proto": "https"},
                local_addr=(source, 0), open_timeout=20, close_timeout=2, ping_interval=None)
            try:
                self.frames.append(self.ws.recv(timeout=0.5))
            except TimeoutError:
                break  # open, nothing to replay
            except ConnectionClosed:
                assert self.ws.close_code == 1013, self.ws.close_code
                expected.handshake("unavailable")
                continue
            if 'data-error="unavailable"' in self.frames[-1]:
                try:
                    self.ws.recv(timeout=5)
                except ConnectionClosed:
                    pass
                assert self.ws.close_code == 1013, self.ws.close_code
                expected.handshake("unavailable")
                self.frames.clear()
                continue
            break
        else:
            raise AssertionError(f"{source}: no connection after 5 attempts")
        expected.handshake("accepted")
        expected.add("chat_websocket_connections", 1)

    def send(self, text: str):
        cc.send(self.ws, text)

    def wait(self, predicate, what: str, timeout=15):
        """Every frame this socket got is kept: a frame read while waiting for
        another one still counts."""
        deadline = time.monotonic() + timeout
        while not any(predicate(f) for f in self.frames):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{self.source}: no {what} within {timeout}s; got {[f[:100] for f in self.frames[-10:]]}")
            try:
                frame = self.ws.recv(timeout=left)
            except TimeoutError:
                continue
            self.frames.append(frame if isinstance(frame, str) else frame.decode(errors="replace"))

    def wait_for(self, text: str, timeout=15):
        self.wait(lambda f: "data-msg-id" in f and text in f, f"message {text!r}", timeout)

    def wait_error(self, code: str, count: int = 1, timeout=15):
        self.wait(lambda _: sum(f'data-error="{code}"' in f for f in self.frames) >= count, f"{count} x {code}", timeout)

    def worker(self, gunicorn) -> int | None:
        return server_pid(gunicorn.port, self.ws.socket.getsockname()[1], gunicorn.worker_pids())

    def close(self):
        try:
            self.ws.close()
        except Exception:
            pass


def refused(port, path, source, **kw) -> int:
    status, _ = handshake(port, path, source=source, **kw)
    return status


def resync_lines(gunicorn) -> list[tuple[int, int]]:
    return [(int(m.group(1)), int(m.group(2))) for m in RESYNC_LINE.finditer(gunicorn.log())]


# --- the scenario --------------------------------------------------------------------------------

def test_every_counter_matches_the_scripted_scenario(metered, users, make_room, db):
    g = metered
    port = g.port
    room = make_room()
    path = f"/ws/rooms/{room}/"
    started = time.monotonic()

    first = scrape(g, "token")
    expected = Expected(first)
    settle(g, expected, "a fresh instance counts nothing")
    checkpoints = 1

    # 1. four sockets, four addresses.
    clients = [Client(g, users[i], room, f"127.0.10.{i + 1}", expected) for i in range(4)]
    settle(g, expected, "four sockets")
    checkpoints += 1

    # 2. one refusal of each kind, then a handshake limit.
    cookie = cookie_header(users[4])
    assert refused(port, f"/{path}", "127.0.11.1", cookie=cookie) == 403
    assert refused(port, "/ws/nowhere/", "127.0.11.2", cookie=cookie) == 403
    expected.handshake("bad_path", 2)
    assert refused(port, path, "127.0.11.3", cookie=cookie, host="evil.example") == 403
    expected.handshake("bad_host")
    assert refused(port, path, "127.0.11.4", cookie=cookie, origin="https://evil.example") == 403
    expected.handshake("bad_origin")
    assert refused(port, path, "127.0.11.5") == 403
    expected.handshake("unauthenticated")
    assert refused(port, "/ws/rooms/999999999/", "127.0.11.6", cookie=cookie) == 403
    expected.handshake("no_room")
    statuses = [refused(port, path, "127.0.11.7") for _ in range(HANDSHAKE_LIMIT + 2)]
    assert statuses == [403] * HANDSHAKE_LIMIT + [429, 429], statuses
    expected.handshake("unauthenticated", HANDSHAKE_LIMIT)
    expected.handshake("rate_limited", 2)
    expected.limited("handshake", 2)
    settle(g, expected, "refused handshakes")
    checkpoints += 1

    # 3. messages, bad frames, a flood.
    a, b = clients[0], clients[1]
    for n in range(5):
        text = f"m{n} {secrets.token_hex(3)}"
        a.send(text)
        for c in clients:
            c.wait_for(text)
    expected.live(5, 4)
    bad = {"binary": b"\x00\x01", "bad_json": "not json", "missing_message": json.dumps({"message": 5}),
           "empty": json.dumps({"message": "   "}), "too_long": json.dumps({"message": "x" * (MAX_LENGTH + 1)}),
           "bad_text": json.dumps({"message": "a\u0000b"})}
    for code, frame in bad.items():
        a.ws.send(frame)
        a.wait_error(code)
        expected.rejected(code)
    flood = [f"flood {n} {secrets.token_hex(3)}" for n in range(BURST + 3)]
    for text in flood:
        b.send(text)
    b.wait_error("rate_limited", count=3)
    for c in clients:
        c.wait_for(flood[BURST - 1])
    expected.live(BURST, 4)
    expected.rejected("rate_limited", 3)
    expected.limited("frame", 3)
    settle(g, expected, "messages, bad frames and a flood")
    checkpoints += 1

    # 3b. one user's limits: a third socket over CHAT_MAX_SOCKETS_PER_USER, and
    # messages over the user's budget from two sockets each under its own rate.
    room2 = make_room()
    mine = [Client(g, users[5], room2, f"127.0.14.{n}", expected) for n in (1, 2)]
    third = ws_client.connect(
        f"ws://127.0.0.1:{port}/ws/rooms/{room2}/?after=0", origin=f"https://127.0.0.1:{port}",
        additional_headers={"Cookie": cookie_header(users[5]), "X-Forwarded-Proto": "https"},
        local_addr=("127.0.14.3", 0), open_timeout=20, close_timeout=2, ping_interval=None)
    frames = []
    try:
        while True:
            frames.append(third.recv(timeout=10))
    except ConnectionClosed:
        pass
    assert third.close_code == 1008 and any('data-error="too_many_sockets"' in f for f in frames), (third.close_code, frames)
    expected.handshake("too_many_sockets")
    expected.limited("sockets")
    first_half = [f"mine {n} {secrets.token_hex(3)}" for n in range(BURST)]
    for text in first_half:
        mine[0].send(text)
    for c in mine:
        c.wait_for(first_half[-1])
    second_half = [f"mine {n} {secrets.token_hex(3)}" for n in range(BURST, USER_BURST + 1)]
    for text in second_half:
        mine[1].send(text)
    mine[1].wait_error("rate_limited")
    for c in mine:
        c.wait_for(second_half[-2])
    expected.live(USER_BURST, 2)
    expected.rejected("rate_limited")
    expected.limited("user-message")
    for c in mine:
        c.close()
    expected.add("chat_websocket_connections", -2)
    settle(g, expected, "one user's socket and message limits")
    checkpoints += 1

    # 4. logins over the per-address limit.
    browser = Browser(port, "127.0.12.1")
    statuses = []
    for _ in range(LOGIN_LIMIT + 1):
        token = browser.token("/accounts/login/")
        statuses.append(browser.post("/accounts/login/", {"username": f"nobody-{secrets.token_hex(3)}",
                                                          "password": "wrong-password"}, token).status_code)
    browser.close()
    assert statuses == [200] * LOGIN_LIMIT + [429], statuses
    expected.limited("login")
    settle(g, expected, "logins")
    checkpoints += 1

    # 5. Redis down: two messages reach only their sender; back up, the resync sends them to the others.
    c = clients[2]
    g.redis.stop()
    outage = [f"outage {n} {secrets.token_hex(3)}" for n in range(2)]
    for text in outage:
        c.send(text)
        c.wait_for(text, timeout=30)
    g.redis.start()
    for other in (clients[0], clients[1], clients[3]):
        for text in outage:
            other.wait_for(text, timeout=30)
    expected.add("chat_messages_stored_total", 2)
    expected.add("chat_deliveries_total", 2 + 3 * 2)  # the sender's own copies, then 3 sockets x 2 by the resync
    deadline = time.monotonic() + SETTLE
    while sum(frames for _, frames in resync_lines(g)) < 3 * 2:
        assert time.monotonic() < deadline, f"the resync did not log 6 frames: {resync_lines(g)}\n{g.log()[-3000:]}"
        time.sleep(0.2)
    assert sum(frames for _, frames in resync_lines(g)) == 3 * 2, resync_lines(g)
    before_kill = settle(g, expected, "a Redis restart and its resync", missed_by_design=6)
    passes = resync_lines(g)
    assert passes and before_kill[("chat_resync_runs_total", ())] == len(passes) >= 1
    checkpoints += 1

    # 6. SIGKILL the worker holding clients[0].
    victim = clients[0].worker(g)
    assert victim in g.worker_pids(), (victim, g.worker_pids())
    on_victim = [cl for cl in clients if cl.worker(g) == victim]
    survivors = [cl for cl in clients if cl not in on_victim]
    cpu_before = before_kill[("process_cpu_seconds_total", ())]
    assert any(dict(k[1]).get("pid") == str(victim) for k in before_kill if k[0] == "process_resident_memory_bytes")
    # One more message, then no scrape at all for a while: the victim's copies
    # reach the shared files by its once-a-second flush, not by answering a
    # scrape (which flushes too), so they survive the SIGKILL.
    text = f"just before the kill {secrets.token_hex(3)}"
    clients[3].send(text)
    for cl in clients:
        cl.wait_for(text)
    expected.live(1, 4)
    time.sleep(3 * FLUSH_SECONDS)
    os.kill(victim, signal.SIGKILL)
    expected.add("chat_websocket_connections", -len(on_victim))
    after_kill = settle(g, expected, f"worker {victim} SIGKILLed with {len(on_victim)} of 4 sockets", missed_by_design=6)
    checkpoints += 1
    deadline = time.monotonic() + SETTLE
    while any(dict(k[1]).get("pid") == str(victim) for k in after_kill if k[0].startswith("process_")):
        assert time.monotonic() < deadline, "the dead worker's process metrics are still exported"
        time.sleep(0.2)
        after_kill = scrape(g, "port")
    assert after_kill[("process_cpu_seconds_total", ())] >= cpu_before, "CPU seconds went down: a worker's counter was lost"
    new_workers = set(g.worker_pids()) - {victim}
    assert len(new_workers) == 2, g.worker_pids()

    last_seq = db.query("SELECT last_seq FROM chat_room WHERE id = %s", room)[0][0]
    for cl in on_victim:
        cl.close()
    back = [Client(g, cl.user, room, cl.source, expected, after=last_seq) for cl in on_victim]
    clients = survivors + back
    text = f"after the kill {secrets.token_hex(3)}"
    back[0].send(text)  # a fresh socket: a full frame budget
    for cl in clients:
        cl.wait_for(text)
    expected.live(1, 4)
    final = settle(g, expected, "clients back after the SIGKILL, one more message", missed_by_design=6)
    checkpoints += 1
    pids = {dict(k[1]).get("pid") for k in final if k[0] == "process_resident_memory_bytes"}
    deadline = time.monotonic() + SETTLE
    while pids != {str(p) for p in g.worker_pids()}:
        assert time.monotonic() < deadline, (pids, g.worker_pids())
        time.sleep(0.5)
        pids = {dict(k[1]).get("pid") for k in scrape(g, "port") if k[0] == "process_resident_memory_bytes"}

    # Both ways in show the same instance-wide numbers.
    expected.from_log(g, 6)
    assert counted(scrape(g, "token")) == counted(scrape(g, "port")) == expected.values
    passes = resync_lines(g)
    for cl in clients:
        cl.close()
    assert not log_problems(g.log()), log_problems(g.log())
    seconds = time.monotonic() - started
    nonzero = sum(1 for v in expected.values.values() if v)
    results.record(
        "metrics_scenario",
        scenario="Metrics on the real stack (2 workers): a scripted scenario, then a worker SIGKILLed",
        checked="after each step, every chat_* sample (counters by label, the connections gauge, the delivery "
                "histogram's count) equals what the test did, through the app port with the bearer token and through "
                "METRICS_PORT, and again a flush interval later; a message delivered, 3 s without any scrape, then a "
                "worker SIGKILLed: its counts (that message's included) stay, its sockets and its pid's process "
                "metrics leave; resync passes equal the workers' own log lines",
        figure=f"{len(expected.values)} samples ({nonzero} non-zero) exact at {checkpoints} checkpoints on both ways in; "
               f"SIGKILL of a worker holding {len(on_victim)} of 4 sockets: gauge 4 -> {4 - len(on_victim)} -> 4, "
               f"counters unchanged; {len(passes)} resync pass(es) sent 6 frames; {seconds:.0f} s",
        samples=len(expected.values), checkpoints=checkpoints, killed_sockets=len(on_victim), resync_passes=len(passes),
    )


def test_the_metrics_stay_private(metered):
    """The app port serves /metrics only with the token, and answers every
    other attempt exactly like an unknown path; METRICS_PORT serves nothing
    but /metrics. Whatever the Host (a scraper calls the private address)."""
    g = metered
    for proxy, status in (({"X-Forwarded-Proto": "https"}, 404), ({}, 301)):  # 301: SECURE_SSL_REDIRECT
        unknown = get(g.port, "/no-such-path", {"Host": "127.0.0.1", **proxy})
        assert unknown[0] == status, unknown
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Bearer {TOKEN[:-1]}"},
                        {"Authorization": f"Basic {TOKEN}"}, {"X-Metrics-Token": TOKEN}):
            got = get(g.port, "/metrics", {"Host": "127.0.0.1", **proxy, **headers})
            if status == 301:  # the redirect names the path asked for
                got = (got[0], got[1].replace("/metrics", "/no-such-path"))
            assert got == unknown, headers
    # Positive controls: the token, any Host; the private port, any Host, no token.
    for host in ("127.0.0.1", "10.1.2.3:8000", "evil.example"):
        status, text = get(g.port, headers={"Host": host, "Authorization": f"Bearer {TOKEN}"})
        assert status == 200 and "chat_websocket_connections" in text, (host, status)
        status, text = get(g.metrics_port, headers={"Host": host})
        assert status == 200 and "chat_websocket_connections" in text, (host, status)
    for path in ("/", "/healthz", "/accounts/login/", "/metrics/x"):
        assert get(g.metrics_port, path)[0] == 404, path
    assert refused(g.metrics_port, "/ws/rooms/1/", "127.0.13.1") == 403
    assert TOKEN not in g.log()
