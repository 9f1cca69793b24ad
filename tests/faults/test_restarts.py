"""Restarts under a few hundred connected clients: Redis, a killed worker,
a rolling restart (HUP) and a graceful shutdown (SIGTERM).

Ground truth is the database: every message it holds for a room must be
shown by every client in that room (the clients behave like the page:
reconnect with ?after=<newest id shown>). Figures are recorded in results.
"""
from __future__ import annotations

import itertools
import os
import signal
import threading
import time
import urllib.request

import pytest
import redis as redis_py

from tests.faults import results
from tests.faults.conftest import cookie_header, log_problems
from tests.faults.swarm import Swarm, percentile, summary_ms

pytestmark = pytest.mark.integration

ROOMS = 3
PER_ROOM = int(os.environ.get("FAULTS_CLIENTS_PER_ROOM", "100"))  # 300 sockets by default
RATE = 4.0  # messages a second from one sender in each room
# 300 clients from one address reconnecting through kills, HUPs and SIGTERM
# (about 1,000 handshakes a minute): above CHAT_ADDRESS_HANDSHAKES_PER_MINUTE,
# which these scenarios do not test (tests/faults/test_limits.py does).
ONE_ADDRESS_SWARM = {"CHAT_ADDRESS_HANDSHAKES_PER_MINUTE": "100000"}


def readyz(port) -> int:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/readyz", headers={"Host": "127.0.0.1"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def build_swarm(port, users, make_room) -> Swarm:
    cookies = itertools.cycle([cookie_header(u) for u in users])
    rooms = {make_room(): [next(cookies) for _ in range(PER_ROOM)] for _ in range(ROOMS)}
    return Swarm(port, rooms)


def background_chatter(swarm, tag):
    stop = threading.Event()
    thread = threading.Thread(target=swarm.chatter, args=(120, RATE, tag, stop), daemon=True)
    thread.start()
    return stop, thread


def converge(swarm, db, timeout=60.0) -> tuple[float, dict]:
    """Wait until every client shows every stored message of its room."""
    rooms = {c.room for c in swarm.clients}
    started = time.monotonic()
    while True:
        expected = db(rooms)
        missing = swarm.missing(expected)
        if not missing:
            return time.monotonic() - started, expected
        if time.monotonic() - started > timeout:
            sample = {k: sorted(v)[:5] for k, v in list(missing.items())[:5]}
            raise AssertionError(f"{len(missing)} of {len(swarm.clients)} clients miss stored messages after "
                                 f"{timeout}s, e.g. {sample}")
        time.sleep(0.2)


def pubsub_counts(redis_server) -> dict:
    r = redis_py.Redis(host="127.0.0.1", port=redis_server.port)
    channels = r.pubsub_channels()
    groups = [c for c in channels if b"__group__" in c]
    numsub = dict(r.pubsub_numsub(*groups)) if groups else {}
    clients = len(r.client_list())
    r.close()
    return {"channels": len(channels), "groups": len(groups), "max_numsub": max(numsub.values(), default=0),
            "clients": clients}


@pytest.fixture(scope="module")
def resync_only(spawn):
    """A stack whose only catch-up is the one after a Redis reconnect."""
    return spawn(CHAT_RESYNC_INTERVAL="0", **ONE_ADDRESS_SWARM)


@pytest.fixture(scope="module")
def periodic(spawn):
    """A stack with a short periodic resync (the default is 30 s)."""
    return spawn(CHAT_RESYNC_INTERVAL="3", **ONE_ADDRESS_SWARM)


def test_redis_restart_mid_chat_loses_nothing(resync_only, users, make_room, db):
    gunicorn, redis = resync_only, resync_only.redis
    swarm = build_swarm(gunicorn.port, users, make_room)
    connect_s = swarm.start()
    try:
        swarm.chatter(1.5, RATE, "before")
        stop, thread = background_chatter(swarm, "during")
        time.sleep(1.0)
        wall_down = time.time()
        redis.stop()
        down_deadline = time.monotonic() + 3  # /readyz's result may be up to 1 s old (app/health.py)
        while (down_status := readyz(gunicorn.port)) == 200 and time.monotonic() < down_deadline:
            time.sleep(0.1)
        time.sleep(3.0)
        redis.start()
        wall_up, up = time.time(), time.monotonic()
        ready_after = None
        while time.monotonic() - up < 30:
            if readyz(gunicorn.port) == 200:
                ready_after = time.monotonic() - up
                break
            time.sleep(0.1)
        time.sleep(3.0)
        stop.set()
        thread.join(10)
        converged_s, expected = converge(swarm, db)
        since_up = time.monotonic() - up
        rows = db.query("SELECT id, extract(epoch from created_at) FROM chat_message WHERE room_id = ANY(%s)",
                        list(expected))
        outage_ids = {mid for mid, ts in rows if wall_down <= float(ts) <= wall_up}
        late = [seen - up for c in swarm.clients for mid, seen in c.first_seen.items() if mid in outage_ids]
        recovery = max(late) if late else 0.0
        counts = pubsub_counts(redis)
        codes = swarm.close_codes()
        duplicates = swarm.duplicates()
        stored = sum(len(v) for v in expected.values())
    finally:
        swarm.stop()
    problems = log_problems(gunicorn.log())
    results.record(
        "redis_restart",
        scenario=f"Redis restarted mid-chat ({len(swarm.clients)} sockets, 3 s down)",
        checked="every stored message shown to every room member, none twice, sockets stay open, no traceback",
        figure=f"all {stored} messages on all sockets {recovery:.2f} s after Redis returned "
               f"({len(outage_ids)} stored during the outage); /readyz 200 after {ready_after:.2f} s",
        sockets=len(swarm.clients), connect_all_s=round(connect_s, 2), stored=stored, outage_messages=len(outage_ids),
        recovery_s=round(recovery, 2), readyz_down=down_status, readyz_ok_after_s=ready_after,
        verified_after_s=round(since_up, 2), duplicates=duplicates, closes=codes, pubsub=counts,
    )
    assert down_status == 503
    assert outage_ids, "no message was stored while Redis was down: the scenario did not test anything"
    assert duplicates == 0, f"{duplicates} frames arrived twice"
    assert not codes, f"sockets were closed during a Redis restart: {codes}"
    assert counts["channels"] <= len(swarm.clients) + ROOMS + 4, counts
    assert not problems, "\n".join(problems[:20])


def _on_killed_worker(swarm, t_kill):
    return [c for c in swarm.clients if any(t >= t_kill for t, _ in c.closes)]


def test_worker_sigkill_is_replaced_and_clients_miss_nothing(periodic, users, make_room, db):
    gunicorn = periodic
    swarm = build_swarm(gunicorn.port, users, make_room)
    swarm.start()
    kills = []
    try:
        stop, thread = background_chatter(swarm, "kill")
        time.sleep(1.5)
        before = pubsub_counts(gunicorn.redis)
        for _ in range(2):
            old = gunicorn.worker_pids()
            victim = old[0]
            t_kill = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            while True:
                pids = gunicorn.worker_pids()
                if len(pids) == 2 and victim not in pids:
                    replaced = time.monotonic() - t_kill
                    break
                assert time.monotonic() - t_kill < 30, f"worker {victim} not replaced: {pids}"
                time.sleep(0.05)
            hit = _on_killed_worker(swarm, t_kill)
            swarm.wait(lambda: all(c.opens[-1] > t_kill for c in hit), 60, "clients of the killed worker reconnected")
            reconnect = [min(t for t in c.opens if t > t_kill) - t_kill for c in hit]
            kills.append({"replaced_s": round(replaced, 2), "clients": len(hit), "reconnect": summary_ms(reconnect)})
            time.sleep(2.0)
        stop.set()
        thread.join(10)
        converged_s, expected = converge(swarm, db)
        time.sleep(1.0)
        after = pubsub_counts(gunicorn.redis)
        duplicates = swarm.duplicates()
        stored = sum(len(v) for v in expected.values())
    finally:
        swarm.stop()
    results.record(
        "worker_sigkill",
        scenario=f"A worker killed with SIGKILL, twice ({len(swarm.clients)} sockets)",
        checked="master replaces it; its clients reconnect with ?after= and miss nothing; Redis subscriptions stay bounded",
        figure=f"new worker forked {kills[0]['replaced_s']}/{kills[1]['replaced_s']} s after the kill; "
               f"{kills[0]['clients']}+{kills[1]['clients']} clients back in p50 "
               f"{kills[0]['reconnect']['p50_ms']}/{kills[1]['reconnect']['p50_ms']} ms, max "
               f"{kills[0]['reconnect']['max_ms']}/{kills[1]['reconnect']['max_ms']} ms; {stored} messages, 0 missing; "
               f"PubSub channels {before['channels']} before, {after['channels']} after",
        kills=kills, stored=stored, duplicates=duplicates, pubsub_before=before, pubsub_after=after,
    )
    assert all(k["clients"] > 0 for k in kills), f"a killed worker had no clients: {kills}"
    assert after["channels"] <= before["channels"] + 2, f"subscriptions grew: {before} -> {after}"
    assert after["max_numsub"] <= 2, after
    assert not log_problems(gunicorn.log())


def test_rolling_restart_hup_loses_nothing(periodic, users, make_room, db):
    gunicorn = periodic
    swarm = build_swarm(gunicorn.port, users, make_room)
    swarm.start()
    try:
        stop, thread = background_chatter(swarm, "hup")
        time.sleep(1.5)
        old = set(gunicorn.worker_pids())
        t_hup = time.monotonic()
        gunicorn.proc.send_signal(signal.SIGHUP)
        swarm.wait(lambda: all(any(t > t_hup for t in c.opens) for c in swarm.clients), 90,
                   "every client reconnected after HUP")
        all_back = time.monotonic() - t_hup
        new = set(gunicorn.worker_pids())
        time.sleep(2.0)
        stop.set()
        thread.join(10)
        converged_s, expected = converge(swarm, db)
        gaps = []
        codes = {}
        for c in swarm.clients:
            for t, code in c.closes:
                if t > t_hup:
                    codes[code] = codes.get(code, 0) + 1
                    nxt = [o for o in c.opens if o > t]
                    if nxt:
                        gaps.append(nxt[0] - t)
        duplicates = swarm.duplicates()
        stored = sum(len(v) for v in expected.values())
    finally:
        swarm.stop()
    gap = summary_ms(gaps)
    results.record(
        "rolling_restart_hup",
        scenario=f"Rolling restart: gunicorn HUP ({len(swarm.clients)} sockets)",
        checked="old workers close with 1012, clients reconnect with ?after= to new workers, zero messages lost",
        figure=f"all sockets back {all_back:.2f} s after HUP; per-socket gap p50 {gap['p50_ms']} ms, p99 {gap['p99_ms']} ms; "
               f"{stored} messages, 0 missing",
        all_back_s=round(all_back, 2), gap=gap, close_codes=codes, stored=stored, duplicates=duplicates,
    )
    assert not (old & new), f"HUP kept old workers: {old} -> {new}"
    assert set(codes) <= {1012}, f"close codes on HUP: {codes}"
    assert not log_problems(gunicorn.log())


def test_sigterm_closes_sockets_with_1012_within_grace(periodic, users, make_room):
    gunicorn = periodic
    swarm = build_swarm(gunicorn.port, users, make_room)
    swarm.start()
    try:
        t_term = time.monotonic()
        gunicorn.proc.send_signal(signal.SIGTERM)
        swarm.wait(lambda: all(c.closes for c in swarm.clients), 35, "every socket closed after SIGTERM")
        swarm.stopping = True
        closed = [c.closes[0][0] - t_term for c in swarm.clients]
        codes = {}
        for c in swarm.clients:
            codes[c.closes[0][1]] = codes.get(c.closes[0][1], 0) + 1
        gunicorn.proc.wait(35)
        exited = time.monotonic() - t_term
    finally:
        swarm.stop()
    results.record(
        "sigterm",
        scenario=f"Graceful shutdown: SIGTERM ({len(swarm.clients)} sockets)",
        checked="every socket closed with 1012 (htmx-ext-ws reconnects) within graceful_timeout (30 s)",
        figure=f"all closed with 1012 in {max(closed):.2f} s (p50 {percentile(closed, 50):.2f} s); master exited after {exited:.2f} s",
        closed_max_s=round(max(closed), 2), codes=codes, exited_s=round(exited, 2),
    )
    assert codes == {1012: len(swarm.clients)}, codes
    assert max(closed) < 30 and exited < 30
    assert gunicorn.proc.returncode == 0
    assert not log_problems(gunicorn.log())
