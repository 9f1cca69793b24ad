"""Per-user limits on the production stack (gunicorn, 2 Uvicorn workers,
Redis, PostgreSQL), across workers and hosts: concurrent sockets per user
(CHAT_MAX_SOCKETS_PER_USER), including slots held by a worker killed with
SIGKILL, and messages per user over all of its sockets
(CHAT_USER_RATE_PER_SECOND / CHAT_USER_RATE_BURST).

"Two hosts" are two gunicorns sharing one Redis and one PostgreSQL; the
attempts alternate between them (4 workers, one budget). Each scenario uses
fresh accounts made in the database (tests/faults/accounts.py), and clients
bind to their own loopback addresses, so the per-address handshake budgets
of the other tests are untouched.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time

import pytest

from tests.faults import accounts, results
from tests.faults.conftest import log_problems, tag
from tests.faults.holders import Holders
from tests.faults.swarm import Swarm, summary_ms
from tests.harness.services import RedisServer
from tests.harness.sockets import server_pid

pytestmark = pytest.mark.integration

LIMIT = 10  # CHAT_MAX_SOCKETS_PER_USER's default
ATTEMPTS = 100


@pytest.fixture(scope="module")
def two_hosts(spawn):
    """Two gunicorns (default settings) on one new Redis and the shared PostgreSQL."""
    redis = RedisServer().start()
    a, b = spawn(redis=redis), spawn(redis=redis)
    yield a, b
    redis.stop()


@pytest.fixture
def holders():
    h = Holders()
    yield h
    h.stop()


def test_one_user_opening_100_sockets_gets_10(two_hosts, holders, db, stack):
    a, b = two_hosts
    user, other = accounts.seed(stack.env, 2)
    room = accounts.room_with_a_message(db.query, user.id)
    started = time.monotonic()
    conns = holders.open([((a.port, b.port)[n % 2], room, user.cookie(), "127.0.3.1") for n in range(ATTEMPTS)])
    elapsed = time.monotonic() - started
    accepted = [c for c in conns if c.accepted]
    refused = [c for c in conns if not c.accepted]
    holders.wait(lambda: all(c.close_code is not None for c in refused), 10, "the refused sockets closed")
    refusals = {}
    for c in refused:
        refusals[c.ended] = refusals.get(c.ended, 0) + 1
    # positive controls: another user is not affected; a slot freed is reusable (and only one)
    control = holders.open([((a.port, b.port)[n % 2], room, other.cookie(), "127.0.3.2") for n in range(LIMIT)])
    holders.close(accepted[0])
    reused = None
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # the server gives the slot back once it sees the close
        (again,) = holders.open([(b.port, room, user.cookie(), "127.0.3.1")])
        if again.accepted:
            reused = round(time.monotonic() - (deadline - 5), 2)
            break
        time.sleep(0.1)
    (after,) = holders.open([(a.port, room, user.cookie(), "127.0.3.1")])
    holders.wait(lambda: after.close_code is not None, 10, "the refused socket closed")
    still_open = sum(c.open for c in accepted[1:])
    results.record(
        "user-sockets",
        scenario=f"One user opens {ATTEMPTS} sockets, 16 at a time, alternating between 2 gunicorns on one Redis",
        checked=f"at most CHAT_MAX_SOCKETS_PER_USER ({LIMIT}) open at once across both hosts; the rest get "
                "data-error=too_many_sockets + close 1008; another user still gets 10; closing one frees exactly one slot",
        figure=f"{len(accepted)} accepted, {len(refused)} refused ({', '.join(f'{n} x {e}/{code}' for (e, code), n in refusals.items())}) "
               f"in {elapsed:.1f} s; another user: {sum(c.accepted for c in control)} of {LIMIT} accepted; "
               f"after closing one: reusable in {reused} s, the next one refused: {not after.accepted}",
        accepted=len(accepted), refused=len(refused), seconds=round(elapsed, 1), reused_after_s=reused,
    )
    assert len(accepted) == LIMIT, len(accepted)
    assert refusals == {("too_many_sockets", 1008): ATTEMPTS - LIMIT}, refusals
    assert all(c.accepted for c in control)
    assert reused is not None, "a closed socket's slot was never given back"
    assert not after.accepted and after.ended == ("too_many_sockets", 1008)
    assert still_open == LIMIT - 1  # the refusals closed nobody else
    assert not log_problems(a.log() + b.log())


def test_a_sigkilled_workers_slots_are_freed_by_their_lease(spawn, holders, db, stack):
    """SIGKILL leaves no chance to give slots back: they must not leak."""
    gunicorn = spawn()
    (user,) = accounts.seed(stack.env, 1)
    room = accounts.room_with_a_message(db.query, user.id)
    conns = holders.open([(gunicorn.port, room, user.cookie(), "127.0.3.3") for _ in range(LIMIT)])
    assert all(c.accepted for c in conns)
    workers = gunicorn.worker_pids()
    where = {c.local_port: server_pid(gunicorn.port, c.local_port, workers) for c in conns}
    counts = {pid: sum(1 for p in where.values() if p == pid) for pid in workers}
    victim = max(counts, key=counts.get)
    lost = counts[victim]
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    holders.wait(lambda: sum(not c.open for c in conns) >= lost, 10, "the killed worker's sockets to drop")
    attempts = []  # (seconds after the kill, accepted)
    reusable_after = None
    while time.monotonic() - killed_at < 30:
        (c,) = holders.open([(gunicorn.port, room, user.cookie(), "127.0.3.3")])
        attempts.append((round(time.monotonic() - killed_at, 2), c.accepted))
        if c.accepted:
            reusable_after = time.monotonic() - killed_at
            break
        time.sleep(0.25)
    # then the rest of the dead worker's slots, and not one more
    more = holders.open([(gunicorn.port, room, user.cookie(), "127.0.3.3") for _ in range(lost)])
    holders.wait(lambda: all(c.close_code is not None for c in holders.conns if not c.accepted), 10,
                 "the refused sockets closed")
    live = sum(c.open for c in holders.conns)
    survivors_open = sum(c.open for c in conns)
    results.record(
        "user-sockets-sigkill",
        scenario=f"A user's {LIMIT} sockets, the worker holding {lost} of them killed with SIGKILL",
        checked="the dead worker's slots are not given back by anyone: they lapse with its lease (app/chat/slots.py, "
                "10 s) and become reusable, exactly as many as it held; the other worker's sockets stay open",
        figure=f"first attempt after the kill: {'refused' if attempts and not attempts[0][1] else 'accepted'} "
               f"({attempts[0][0] if attempts else None} s); a slot reusable {reusable_after:.1f} s after the kill; "
               f"then {sum(c.accepted for c in more) + 1} of the {lost} freed slots taken, {live} sockets open (limit {LIMIT})"
        if reusable_after is not None else f"no slot reusable within 30 s: {attempts[-3:]}",
        killed=lost, reusable_after_s=reusable_after and round(reusable_after, 2), attempts=len(attempts),
    )
    assert reusable_after is not None, f"slots of a SIGKILLed worker leaked: {attempts[-5:]}"
    assert reusable_after <= 15, reusable_after  # LEASE (10 s) + RENEW (3 s) + slack
    assert survivors_open == LIMIT - lost
    assert sum(c.accepted for c in more) == lost - 1  # every freed slot reusable ...
    assert live == LIMIT, live  # ... and not one more than the limit


# --- one user flooding from 20 sockets ------------------------------------------------------

FLOOD_SOCKETS = 20
FLOOD_PER_SOCKET_RATE = 50  # frames a second from each socket
PHASE = 4.0
TALKERS = 5
LISTENERS = 25
TALK_EVERY = 0.5


@pytest.fixture(scope="module")
def flood_hosts(spawn):
    """Two gunicorns on one new Redis, with room for 20 sockets per user (raised
    on purpose: this scenario is about the per-user message budget, which keeps
    its default of 5 a second, bursts of 10)."""
    redis = RedisServer().start()
    a = spawn(redis=redis, CHAT_MAX_SOCKETS_PER_USER=str(FLOOD_SOCKETS))
    b = spawn(redis=redis, CHAT_MAX_SOCKETS_PER_USER=str(FLOOD_SOCKETS))
    yield a, b
    redis.stop()


def talk(swarm, talkers, label, seconds):
    n = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for t in talkers:
            swarm.send_from(t, f"{label} {t.index} #{n}")
        n += 1
        time.sleep(TALK_EVERY)


def latencies(swarm, listeners, label):
    sent = {text: at for _, text, at in swarm.sent if text.startswith(label + " ")}
    out = []
    for c in listeners:
        for mid, frame in c.texts.items():
            body = re.search(r'<p class="body">(.*?)</p>', frame).group(1)
            if body in sent:
                out.append(c.first_seen[mid] - sent[body])
    return out


def test_20_sockets_of_one_user_flooding_get_one_budget(flood_hosts, holders, db, stack):
    a, b = flood_hosts
    flooder, *people = accounts.seed(stack.env, 1 + TALKERS + 5)
    room = accounts.room_with_a_message(db.query, people[0].id)
    talker_cookies = [p.cookie() for p in people[:TALKERS]]
    listener_cookies = [people[TALKERS + n % 5].cookie() for n in range(LISTENERS)]
    swarm = Swarm(a.port, {room: talker_cookies + listener_cookies}, server=a)
    swarm.start()
    talkers, listeners = swarm.clients[:TALKERS], swarm.clients[TALKERS:]
    sockets = holders.open([((a.port, b.port)[n % 2], room, flooder.cookie(), "127.0.3.4") for n in range(FLOOD_SOCKETS)])
    run = tag()
    flood = {}
    try:
        assert all(c.accepted for c in sockets), [c.ended for c in sockets if not c.accepted]
        time.sleep(0.5)
        talk(swarm, talkers, f"base-{run}", PHASE)
        time.sleep(1.0)

        async def flood_all():
            started = time.monotonic()
            frames = int(PHASE * FLOOD_PER_SOCKET_RATE)

            async def one(c, n):
                for k in range(frames):
                    try:
                        await c.ws.send(json.dumps({"message": f"flood-{run} {n} #{k}"}))
                    except Exception:  # noqa: BLE001 - counted below as not sent
                        return k
                    await asyncio.sleep(1 / FLOOD_PER_SOCKET_RATE)
                return frames

            sent = await asyncio.gather(*(one(c, n) for n, c in enumerate(sockets)))
            return sum(sent), time.monotonic() - started

        future = asyncio.run_coroutine_threadsafe(flood_all(), holders.loop)
        talk(swarm, talkers, f"flood-phase-{run}", PHASE)
        sent, seconds = future.result(PHASE + 30)
        time.sleep(1.5)
        base = summary_ms(latencies(swarm, listeners, f"base-{run}"))
        during = summary_ms(latencies(swarm, listeners, f"flood-phase-{run}"))
        talker_errors = sum(len(t.errors) for t in talkers)
    finally:
        swarm.stop()
    (stored,) = db.query("SELECT count(*) FROM chat_message WHERE author_id = %s", flooder.id)[0]
    rate_limited = sum(c.errors.count("rate_limited") for c in sockets)
    budget = 10 + 5 * seconds  # CHAT_USER_RATE_BURST + CHAT_USER_RATE_PER_SECOND x time
    per_socket_only = FLOOD_SOCKETS * (10 + 5 * seconds)  # what the per-socket buckets alone let through
    flood.update(sent=sent, seconds=round(seconds, 2), stored=stored, rate_limited=rate_limited,
                 budget=round(budget, 1), per_socket_only=round(per_socket_only))
    results.record(
        "user-flood",
        scenario=f"{FLOOD_SOCKETS} sockets of one user (10 on each of 2 gunicorns on one Redis, CHAT_MAX_SOCKETS_PER_USER "
                 f"raised to {FLOOD_SOCKETS} for this) flood a room of "
                 f"{len(swarm.clients) + FLOOD_SOCKETS}: {sent} frames in {seconds:.1f} s",
        checked="stored at most the user's budget (CHAT_USER_RATE_BURST 10 + CHAT_USER_RATE_PER_SECOND 5 x time), "
                "however many sockets and hosts; the rest data-error=rate_limited; the others' send-to-shown latency "
                "stays normal and no other user is throttled",
        figure=f"flooder: {stored} stored (budget {budget:.0f}; the per-socket buckets alone would allow "
               f"{per_socket_only:.0f}), {rate_limited} rate_limited; others p50/p99 {base['p50_ms']}/{base['p99_ms']} ms "
               f"without, {during['p50_ms']}/{during['p99_ms']} ms with the flood; other users throttled: {talker_errors}",
        flood=flood, baseline=base, during_flood=during, talker_errors=talker_errors,
    )
    assert stored <= budget + 2, flood  # +2: a token refilled while the last frames were in flight
    assert stored >= 10, flood  # the budget is used, not refused outright
    assert rate_limited >= sent - stored - 5, flood
    assert talker_errors == 0, "another user was throttled"
    assert base["n"] > 0 and during["n"] >= base["n"] * 0.9, (base, during)
    assert during["p99_ms"] <= max(1000.0, 4 * base["p99_ms"]), (base, during)
    assert not log_problems(a.log() + b.log())
