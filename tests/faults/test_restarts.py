"""Restarts under a few hundred connected clients: Redis, a killed worker,
a rolling restart (HUP) and a graceful shutdown (SIGTERM).

Ground truth is the database: every message it holds for a room must be
shown by every client in that room exactly once (the clients behave like the
page: they reconnect with ?after=<cursor>, the highest seq below which they
show every message, and drop a message they already show). Several senders
per room write at the same moment through *both* gunicorn workers
(Swarm.senders picks them by which worker holds each socket, and again after
a restart moved them), so messages of one room commit and are published out
of id order - the case a cursor of "newest id shown" loses. Figures are
recorded in results.
"""
from __future__ import annotations

import itertools
import os
from contextlib import contextmanager
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
INTERVAL = 0.5  # seconds between rounds; each round every sender of every room sends one message
PER_WORKER = 2  # senders per room on each worker: 4 senders per room, 2 messages a second each
# 300 clients from one address reconnecting through kills, HUPs and SIGTERM
# (about 1,000 handshakes a minute): above CHAT_ADDRESS_HANDSHAKES_PER_MINUTE,
# which these scenarios do not test (tests/faults/test_limits.py does).
# The same 300 sockets belong to 6 accounts (50 each), and 4 senders per room
# send 2 messages a second each, several on one account: above
# CHAT_MAX_SOCKETS_PER_USER (10) and CHAT_USER_RATE_PER_SECOND (5), which these
# scenarios do not test either (tests/faults/test_user_limits.py does). After a
# SIGKILL, reconnecting clients would also wait for the dead worker's slots to
# lapse (10 s), which is not what the restart figures measure.
LIMITS_NOT_UNDER_TEST = {"CHAT_ADDRESS_HANDSHAKES_PER_MINUTE": "100000", "CHAT_MAX_SOCKETS_PER_USER": "100000",
                     "CHAT_USER_RATE_PER_SECOND": "100000", "CHAT_USER_RATE_BURST": "100000"}


def readyz(port) -> int:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/readyz", headers={"Host": "127.0.0.1"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def build_swarm(gunicorn, users, make_room) -> Swarm:
    cookies = itertools.cycle([cookie_header(u) for u in users])
    rooms = {make_room(): [next(cookies) for _ in range(PER_ROOM)] for _ in range(ROOMS)}
    return Swarm(gunicorn.port, rooms, server=gunicorn)


def start(swarm) -> float:
    """Connect everybody, then make sure every room has senders on both workers."""
    connect_s = swarm.start()
    swarm.spread(PER_WORKER)
    return connect_s


class Chatter:
    """Concurrent senders on both workers, in a thread, until stopped."""

    def __init__(self, swarm: Swarm, tag: str):
        self.swarm, self.stop_event, self.reselect = swarm, threading.Event(), threading.Event()
        self.error = None
        self.thread = threading.Thread(target=self._run, args=(tag,), daemon=True)
        self.thread.start()

    def _run(self, tag):
        try:
            self.swarm.chatter(120, INTERVAL, tag, self.stop_event, per_worker=PER_WORKER, reselect=self.reselect)
        except BaseException as exc:  # surfaced by stop()
            self.error = exc

    def stop(self):
        self.stop_event.set()
        self.thread.join(15)
        if self.error is not None:
            raise AssertionError(f"the senders stopped: {self.error!r}") from self.error


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
                                 f"{timeout}s, e.g. {sample}\n"
                                 + swarm.diagnose([c for c in swarm.clients if c.index in missing]))
        time.sleep(0.2)


def assert_exactly_once(swarm, expected):
    """Every client shows exactly the stored messages of its room (converge
    checked none is missing): nothing the database does not hold, and the
    server sent no message twice on a connection nor replayed one at or
    below the cursor a client connected with."""
    extra = {c.index: set(c.first_seen) - expected[c.room] for c in swarm.clients if set(c.first_seen) - expected[c.room]}
    assert not extra, f"clients show messages the database does not hold: {dict(list(extra.items())[:5])}"
    assert swarm.duplicates() == 0, f"{swarm.duplicates()} frames sent twice (per connection or below the cursor)"


def concurrency_figures(swarm) -> dict:
    """`late_arrivals`: frames a client got after a frame with a higher seq on
    the same connection - each one a message that a cursor of "newest shown"
    would have stepped over."""
    return {"senders_per_room": 2 * PER_WORKER, "rounds": len(swarm.rounds),
            "rounds_on_both_workers": swarm.concurrent_rounds(), "late_arrivals": swarm.late(),
            "resent_after_reconnect": swarm.resent(), "duplicates": swarm.duplicates(),
            "send_failures": swarm.send_failures}


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
    return spawn(CHAT_RESYNC_INTERVAL="0", **LIMITS_NOT_UNDER_TEST)


@pytest.fixture(scope="module")
def no_resync(spawn):
    """No catch-up at all: the negative control of the Redis restart."""
    return spawn(CHAT_RESYNC_INTERVAL="0", CHAT_RESYNC_ON_REDIS_RECONNECT="False", **LIMITS_NOT_UNDER_TEST)


@pytest.fixture(scope="module")
def periodic(spawn):
    """A stack with a short periodic resync (the default is 30 s)."""
    return spawn(CHAT_RESYNC_INTERVAL="3", **LIMITS_NOT_UNDER_TEST)


@contextmanager
def redis_restart(gunicorn, users, make_room, settle=3.0):
    """Chat on both workers, Redis down for 3 s, chat on; gives the swarm
    (still connected) and what happened, and the caller decides what must hold."""
    redis = gunicorn.redis
    swarm = build_swarm(gunicorn, users, make_room)
    try:
        out = {"connect_s": start(swarm), "since": time.monotonic()}
        chatter = Chatter(swarm, "redis")
        time.sleep(1.5)
        out["wall_down"] = time.time()
        redis.stop()
        down_deadline = time.monotonic() + 3  # /readyz's result may be up to 1 s old (app/health.py)
        while (down_status := readyz(gunicorn.port)) == 200 and time.monotonic() < down_deadline:
            time.sleep(0.1)
        out["down_status"] = down_status
        time.sleep(3.0)
        redis.start()
        out["wall_up"], up = time.time(), time.monotonic()
        out["ready_after"] = None
        while time.monotonic() - up < 30:
            if readyz(gunicorn.port) == 200:
                out["ready_after"] = time.monotonic() - up
                break
            time.sleep(0.1)
        time.sleep(settle)
        chatter.stop()
        out["up"] = up
        yield swarm, out
    finally:
        swarm.stop()


def outage_ids(db, expected, wall_down, wall_up) -> set[int]:
    rows = db.query("SELECT id, extract(epoch from created_at) FROM chat_message WHERE room_id = ANY(%s)", list(expected))
    return {mid for mid, ts in rows if wall_down <= float(ts) <= wall_up}


def test_redis_restart_mid_chat_loses_nothing(resync_only, users, make_room, db):
    gunicorn = resync_only
    with redis_restart(gunicorn, users, make_room) as (swarm, out):
        converged_s, expected = converge(swarm, db)
        since_up = time.monotonic() - out["up"]
        during = outage_ids(db, expected, out["wall_down"], out["wall_up"])
        late = [seen - out["up"] for c in swarm.clients for mid, seen in c.first_seen.items() if mid in during]
        recovery = max(late) if late else 0.0
        counts = pubsub_counts(gunicorn.redis)
        codes = swarm.close_codes(since=out["since"])
        stored = sum(len(v) for v in expected.values())
        conc = concurrency_figures(swarm)
    problems = log_problems(gunicorn.log())
    results.record(
        "redis_restart",
        scenario=f"Redis restarted mid-chat ({len(swarm.clients)} sockets, {conc['senders_per_room']} concurrent senders "
                 f"per room on both workers, 3 s down)",
        checked="every stored message shown exactly once by every room member (missing 0, twice 0), sockets stay open, "
                "no traceback",
        figure=f"all {stored} messages on all sockets {recovery:.2f} s after Redis returned ({len(during)} stored during "
               f"the outage; {conc['late_arrivals']} frames arrived after a newer one); missing 0, twice 0; /readyz 200 after {out['ready_after']:.2f} s",
        sockets=len(swarm.clients), connect_all_s=round(out["connect_s"], 2), stored=stored, outage_messages=len(during),
        recovery_s=round(recovery, 2), readyz_down=out["down_status"], readyz_ok_after_s=out["ready_after"],
        verified_after_s=round(since_up, 2), closes=codes, pubsub=counts, **conc,
    )
    assert out["down_status"] == 503
    assert during, "no message was stored while Redis was down: the scenario did not test anything"
    assert conc["rounds_on_both_workers"] > 0, f"the senders never wrote through both workers at once: {conc}"
    assert_exactly_once(swarm, expected)
    assert not codes, f"sockets were closed during a Redis restart: {codes}"
    # one channel per socket, one per room group, and per worker the revocation
    # listener's channel and its group (app/chat/revocation.py); + 4 of slack
    assert counts["channels"] <= len(swarm.clients) + ROOMS + 2 * len(gunicorn.worker_pids()) + 4, counts
    assert not problems, "\n".join(problems[:20])


def test_without_the_resync_a_redis_restart_loses_messages(no_resync, users, make_room, db):
    """Negative control of the test above: the same scenario with
    CHAT_RESYNC_ON_REDIS_RECONNECT=False and no periodic resync. Redis PubSub
    keeps nothing, so what was published while it was down must be missing."""
    gunicorn = no_resync
    with redis_restart(gunicorn, users, make_room) as (swarm, out):
        time.sleep(2.0)  # the positive control converges within about 1 s of Redis returning
        expected = db({c.room for c in swarm.clients})
        during = outage_ids(db, expected, out["wall_down"], out["wall_up"])
        missing = swarm.missing(expected)
        missing_outage = {i: gap & during for i, gap in missing.items() if gap & during}
        codes = swarm.close_codes(since=out["since"])
    worst = max((len(g) for g in missing_outage.values()), default=0)
    results.record(
        "redis_restart_without_resync",
        scenario=f"The same Redis restart with CHAT_RESYNC_ON_REDIS_RECONNECT=False, no periodic resync (negative control)",
        checked="without the resync clients miss the messages of the outage (so the test above can fail)",
        figure=f"{len(missing_outage)} of {len(swarm.clients)} clients miss messages stored during the outage "
               f"(up to {worst} of {len(during)} each)",
        sockets=len(swarm.clients), outage_messages=len(during), clients_missing=len(missing_outage), worst=worst,
        closes=codes,
    )
    assert during, "no message was stored while Redis was down: the control did not test anything"
    assert len(missing_outage) == len(swarm.clients), (
        f"only {len(missing_outage)} of {len(swarm.clients)} clients miss outage messages without the resync")


def test_worker_sigkill_is_replaced_and_clients_miss_nothing(periodic, users, make_room, db):
    gunicorn = periodic
    swarm = build_swarm(gunicorn, users, make_room)
    start(swarm)
    kills = []
    try:
        chatter = Chatter(swarm, "kill")
        time.sleep(1.5)
        before = pubsub_counts(gunicorn.redis)
        for _ in range(2):
            old = gunicorn.worker_pids()
            # The worker holding the most sockets: under load the kernel may
            # hand every reconnect to one worker, leaving the other empty.
            where = list(swarm.placement().values())
            victim = max(old, key=where.count)
            t_kill = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            while True:
                pids = gunicorn.worker_pids()
                if len(pids) == 2 and victim not in pids:
                    replaced = time.monotonic() - t_kill
                    break
                assert time.monotonic() - t_kill < 30, f"worker {victim} not replaced: {pids}\n{swarm.server_state()}"
                time.sleep(0.05)
            hit = [c for c in swarm.clients if any(t >= t_kill for t, _ in c.closes)]
            swarm.wait(lambda: all(c.opens[-1][0] > t_kill for c in hit), 60, "clients of the killed worker reconnected",
                       pending=lambda: [c for c in hit if c.opens[-1][0] <= t_kill])
            chatter.reselect.set()  # senders on both workers again (the new one holds the reconnected)
            reconnect = [min(t for t, _ in c.opens if t > t_kill) - t_kill for c in hit]
            kills.append({"replaced_s": round(replaced, 2), "clients": len(hit), "reconnect": summary_ms(reconnect)})
            time.sleep(2.0)
        chatter.stop()
        converged_s, expected = converge(swarm, db)
        time.sleep(1.0)
        after = pubsub_counts(gunicorn.redis)
        stored = sum(len(v) for v in expected.values())
        conc = concurrency_figures(swarm)
        assert_exactly_once(swarm, expected)
    finally:
        swarm.stop()
    results.record(
        "worker_sigkill",
        scenario=f"A worker killed with SIGKILL, twice ({len(swarm.clients)} sockets, {conc['senders_per_room']} "
                 f"concurrent senders per room on both workers)",
        checked="master replaces it; its clients reconnect with ?after=<cursor>; every stored message shown exactly "
                "once; Redis subscriptions stay bounded",
        figure=f"new worker forked {kills[0]['replaced_s']}/{kills[1]['replaced_s']} s after the kill; "
               f"{kills[0]['clients']}+{kills[1]['clients']} clients back in p50 "
               f"{kills[0]['reconnect']['p50_ms']}/{kills[1]['reconnect']['p50_ms']} ms, max "
               f"{kills[0]['reconnect']['max_ms']}/{kills[1]['reconnect']['max_ms']} ms; {stored} messages "
               f"({conc['late_arrivals']} frames arrived after a newer one), missing 0, twice 0 "
               f"({conc['resent_after_reconnect']} early ones resent by a replay, dropped as the page does); "
               f"PubSub channels {before['channels']} before, {after['channels']} after",
        kills=kills, stored=stored, pubsub_before=before, pubsub_after=after, **conc,
    )
    assert all(k["clients"] > 0 for k in kills), f"a killed worker had no clients: {kills}"
    assert conc["rounds_on_both_workers"] > 0, f"the senders never wrote through both workers at once: {conc}"
    assert after["channels"] <= before["channels"] + 2, f"subscriptions grew: {before} -> {after}"
    assert after["max_numsub"] <= 2, after
    assert not log_problems(gunicorn.log())


def test_rolling_restart_hup_loses_nothing(periodic, users, make_room, db):
    gunicorn = periodic
    swarm = build_swarm(gunicorn, users, make_room)
    start(swarm)
    try:
        chatter = Chatter(swarm, "hup")
        time.sleep(1.5)
        old = set(gunicorn.worker_pids())
        t_hup = time.monotonic()
        gunicorn.proc.send_signal(signal.SIGHUP)

        def not_back():
            return [c for c in swarm.clients if not any(t > t_hup for t, _ in c.opens)]

        swarm.wait(lambda: not not_back(), 90, "every client reconnected after HUP", pending=not_back)
        all_back = time.monotonic() - t_hup
        new = set(gunicorn.worker_pids())
        chatter.reselect.set()  # senders on both new workers
        time.sleep(2.0)
        chatter.stop()
        converged_s, expected = converge(swarm, db)
        gaps = []
        codes = {}
        for c in swarm.clients:
            for t, code in c.closes:
                if t > t_hup:
                    codes[code] = codes.get(code, 0) + 1
                    nxt = [o for o, _ in c.opens if o > t]
                    if nxt:
                        gaps.append(nxt[0] - t)
        refused = {}
        for c in swarm.clients:
            for t, why in c.refused:
                if t > t_hup:
                    kind = str(why).split(":")[0]
                    refused[kind] = refused.get(kind, 0) + 1
        stored = sum(len(v) for v in expected.values())
        conc = concurrency_figures(swarm)
        assert_exactly_once(swarm, expected)
    finally:
        swarm.stop()
    gap = summary_ms(gaps)
    results.record(
        "rolling_restart_hup",
        scenario=f"Rolling restart: gunicorn HUP ({len(swarm.clients)} sockets, {conc['senders_per_room']} concurrent "
                 f"senders per room on both workers)",
        checked="old workers close with 1012, clients reconnect with ?after=<cursor> to new workers (retrying any "
                "failed connect), every stored message shown exactly once",
        figure=f"all sockets back {all_back:.2f} s after HUP; per-socket gap p50 {gap['p50_ms']} ms, p99 {gap['p99_ms']} ms; "
               f"{stored} messages ({conc['late_arrivals']} frames arrived after a newer one), missing 0, twice 0 "
               f"({conc['resent_after_reconnect']} early ones resent by a replay, dropped as the page does); "
               f"failed connects retried: {refused or 'none'}",
        all_back_s=round(all_back, 2), gap=gap, close_codes=codes, stored=stored, refused=refused, **conc,
    )
    assert not (old & new), f"HUP kept old workers: {old} -> {new}"
    assert set(codes) <= {1012}, f"close codes on HUP: {codes}"
    assert conc["rounds_on_both_workers"] > 0, f"the senders never wrote through both workers at once: {conc}"
    assert not log_problems(gunicorn.log())


def test_sigterm_closes_sockets_with_1012_within_grace(periodic, users, make_room):
    gunicorn = periodic
    swarm = build_swarm(gunicorn, users, make_room)
    swarm.start()
    try:
        # Every socket open at the signal (one refused earlier, e.g. 1013 when a
        # busy machine made a Redis call time out, has reconnected by then).
        swarm.wait(lambda: all(c.is_open for c in swarm.clients), 30, "every socket open before SIGTERM",
                   pending=lambda: [c for c in swarm.clients if not c.is_open])
        t_term = time.monotonic()
        gunicorn.proc.send_signal(signal.SIGTERM)

        def first_close(c):
            return next(((t, code) for t, code in c.closes if t >= t_term), None)

        swarm.wait(lambda: all(first_close(c) for c in swarm.clients), 35, "every socket closed after SIGTERM",
                   pending=lambda: [c for c in swarm.clients if not first_close(c)])
        swarm.stopping = True
        closed = [first_close(c)[0] - t_term for c in swarm.clients]
        codes = {}
        for c in swarm.clients:
            code = first_close(c)[1]
            codes[code] = codes.get(code, 0) + 1
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
