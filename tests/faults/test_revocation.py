"""A revoked session, user or room loses its open sockets, on every worker of
every host, on the production stack (2 gunicorns x 2 Uvicorn workers on one
Redis and one PostgreSQL): logout, password change, `is_active=False`, the
user deleted, the room deleted, each measured from the change to the socket
closed (close code and error frame as the page needs them), and the periodic
re-check that catches what no signal announces (rows changed with SQL).

Password change, deactivation and deletion are made by another process
(`manage.py shell`, as an operator would): its signals publish through Redis.
Every scenario has positive controls: the same user's other browser (logout),
other users, another room keep their sockets, and those still work.
"""
from __future__ import annotations

import re
import secrets
import threading
import time

import httpx
import pytest

from tests.faults import accounts, results
from tests.faults.conftest import log_problems
from tests.faults.holders import Holders
from tests.harness.services import RedisServer
from tests.harness.sockets import server_pid

pytestmark = pytest.mark.integration

WITHIN = 2.0  # seconds from the change to the socket closed (the bound)
PER_USER = 8  # sockets of the revoked user: 4 on each host


@pytest.fixture(scope="module")
def hosts(spawn):
    """Two gunicorns on one new Redis and the shared PostgreSQL; the periodic
    re-check at its default (30 s), so a close within 2 s is the signal's."""
    redis = RedisServer().start()
    a, b = spawn(redis=redis), spawn(redis=redis)
    yield a, b
    redis.stop()


@pytest.fixture
def holders():
    h = Holders()
    yield h
    h.stop()


def spread(hosts, room, cookie, n, source):
    a, b = hosts
    return [((a.port, b.port)[k % 2], room, cookie, source) for k in range(n)]


def workers_of(hosts, conns) -> int:
    """How many distinct worker processes held these sockets."""
    pids = set()
    for host in hosts:
        workers = host.worker_pids()
        for c in conns:
            if c.port == host.port and c.local_port:
                pid = server_pid(host.port, c.local_port, workers)
                if pid:
                    pids.add(pid)
    return len(pids)


def form_post(port, path, session_key, fields=None) -> int:
    """A form POST as the browser sends it (CSRF token from a page, same Origin)."""
    base = {"Host": f"127.0.0.1:{port}", "X-Forwarded-Proto": "https"}
    origin = f"https://127.0.0.1:{port}"
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        page = client.get("/", headers={**base, "Cookie": f"sessionid={session_key}"})
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)
        csrf = page.cookies.get("csrftoken")
        response = client.post(path, data={"csrfmiddlewaretoken": token, **(fields or {})},
                               headers={**base, "Cookie": f"sessionid={session_key}; csrftoken={csrf}",
                                        "Origin": origin, "Referer": origin + "/"})
    return response.status_code


def closed_within(holders, conns, timeout):
    holders.wait(lambda: all(c.close_code is not None for c in conns), timeout, "the revoked sockets to close")


def still_works(holders, conn) -> bool:
    """An open socket sends a message and gets it back."""
    text = f"still here {secrets.token_hex(3)}"
    if not conn.open or not holders.send(conn, text):
        return False
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if any(text in f for f in conn.frames):
            return True
        time.sleep(0.02)
    return False


def delays(conns, since) -> dict:
    values = sorted(c.closed_at - since for c in conns)
    return {"n": len(values), "p50_ms": round(1000 * values[len(values) // 2], 1), "max_ms": round(1000 * values[-1], 1)}


def test_logout_closes_that_sessions_sockets_on_every_host(hosts, holders, db, stack):
    a, b = hosts
    (user, other) = accounts.seed(stack.env, 2, sessions=2)
    room = accounts.room_with_a_message(db.query, other.id)
    mine = holders.open(spread(hosts, room, user.cookie(0), PER_USER, "127.0.4.1"))
    same_user_elsewhere = holders.open(spread(hosts, room, user.cookie(1), 2, "127.0.4.1"))
    others = holders.open(spread(hosts, room, other.cookie(0), 2, "127.0.4.2"))
    assert all(c.accepted for c in mine + same_user_elsewhere + others)
    spread_over = workers_of(hosts, mine)
    started = time.time()
    assert form_post(a.port, "/accounts/logout/", user.sessions[0]) == 302
    closed_within(holders, mine, 10)
    took = delays(mine, started)
    ended = {c.ended for c in mine}
    time.sleep(0.5)
    controls = [still_works(holders, c) for c in same_user_elsewhere + others]
    results.record(
        "revoke-logout",
        scenario=f"Logout, with {PER_USER} sockets of that session on 2 gunicorns (workers holding them: {spread_over} of 4)",
        checked=f"every socket of that session closed within {WITHIN:.0f} s with data-error=signed_out + 4401; the same "
                "user's other browser and another user keep working sockets",
        figure=f"logout to closed: p50 {took['p50_ms']} ms, max {took['max_ms']} ms; {sorted(ended)}; "
               f"controls still working: {sum(controls)} of {len(controls)}",
        delays=took, workers=spread_over,
    )
    assert ended == {("signed_out", 4401)}, ended
    assert took["max_ms"] <= WITHIN * 1000, took
    assert all(controls), controls
    assert not log_problems(a.log() + b.log())


@pytest.mark.parametrize("what, expected", [
    ("password", ("signed_out", 4401)),
    ("deactivate", ("account_disabled", 4403)),
    ("delete", ("signed_out", 4401)),
])
def test_user_changes_close_that_users_sockets_on_every_host(hosts, holders, db, stack, what, expected):
    a, b = hosts
    (user, other) = accounts.seed(stack.env, 2, sessions=2)
    room = accounts.room_with_a_message(db.query, other.id)
    # two browsers of the user: both are that user's
    mine = holders.open(spread(hosts, room, user.cookie(0), PER_USER // 2, "127.0.4.3")
                        + spread(hosts, room, user.cookie(1), PER_USER // 2, "127.0.4.3"))
    others = holders.open(spread(hosts, room, other.cookie(0), 2, "127.0.4.4"))
    assert all(c.accepted for c in mine + others)
    spread_over = workers_of(hosts, mine)
    stop = threading.Event()

    def keep_talking():  # the user's script keeps sending while it is revoked
        n = 0
        while not stop.is_set():
            for c in mine:
                if c.open:
                    holders.send(c, f"still talking {n}")
                    n += 1
            time.sleep(0.25)

    talker = threading.Thread(target=keep_talking, daemon=True)
    talker.start()
    time.sleep(0.5)
    before, after = accounts.change(a.env, user.id, what)
    try:
        closed_within(holders, mine, 10)
    finally:
        stop.set()
        talker.join(5)
    took = delays(mine, before)
    ended = {c.ended for c in mine}
    last_close = max(c.closed_at for c in mine)
    if what == "delete":  # a deleted author's messages are kept, without their author
        (stored_after,) = db.query("SELECT count(*) FROM chat_message WHERE room_id = %s AND author_id IS NULL "
                                   "AND created_at > to_timestamp(%s)", room, last_close)[0]
    else:
        (stored_after,) = db.query("SELECT count(*) FROM chat_message WHERE author_id = %s AND "
                                   "created_at > to_timestamp(%s)", user.id, last_close)[0]
    time.sleep(0.5)
    controls = [still_works(holders, c) for c in others]
    results.record(
        f"revoke-{what}",
        scenario={"password": "Password changed", "deactivate": "is_active=False",
                  "delete": "User deleted"}[what] + f" by another process (manage.py shell), {PER_USER} sockets "
                 f"of that user in 2 browsers on 2 gunicorns (workers holding them: {spread_over} of 4), the user's script sending meanwhile",
        checked=f"every socket of that user closed within {WITHIN:.0f} s with data-error={expected[0]} + {expected[1]}; "
                "nothing stored after the close; another user's sockets keep working",
        figure=f"change to closed: p50 {took['p50_ms']} ms, max {took['max_ms']} ms (from just before the change's "
               f"save; the save itself returned after {1000 * (after - before):.0f} ms); {sorted(ended)}; "
               + f"stored after the close: {stored_after}; controls still working: {sum(controls)} of {len(controls)}",
        delays=took, workers=spread_over, stored_after_close=stored_after,
    )
    assert ended == {expected}, ended
    assert took["max_ms"] <= WITHIN * 1000, took
    assert stored_after == 0, stored_after
    assert all(controls), controls
    assert not log_problems(a.log() + b.log())


def test_room_deleted_closes_its_sockets_on_every_host(hosts, holders, db, stack):
    a, b = hosts
    owner, guest, third = accounts.seed(stack.env, 3)
    room = accounts.room_with_a_message(db.query, owner.id)
    next_door = accounts.room_with_a_message(db.query, owner.id)
    inside = holders.open(spread(hosts, room, owner.cookie(), 4, "127.0.4.5")
                          + spread(hosts, room, guest.cookie(), 4, "127.0.4.5")
                          + spread(hosts, room, third.cookie(), 2, "127.0.4.5"))
    outside = holders.open(spread(hosts, next_door, guest.cookie(), 2, "127.0.4.6"))
    assert all(c.accepted for c in inside + outside)
    spread_over = workers_of(hosts, inside)
    not_owner = form_post(b.port, f"/rooms/{room}/delete/", guest.sessions[0])
    time.sleep(0.3)
    untouched = all(c.open for c in inside)
    started = time.time()
    assert form_post(b.port, f"/rooms/{room}/delete/", owner.sessions[0]) == 302
    closed_within(holders, inside, 10)
    took = delays(inside, started)
    ended = {c.ended for c in inside}
    time.sleep(0.5)
    controls = [still_works(holders, c) for c in outside]
    results.record(
        "revoke-room",
        scenario=f"Room deleted by its creator (POST /rooms/<id>/delete/) with {len(inside)} sockets of 3 users in it "
                 f"on 2 gunicorns (workers holding them: {spread_over} of 4)",
        checked=f"every socket in the room closed within {WITHIN:.0f} s with data-error=room_deleted + 4404; another "
                "user's delete refused with 403 and closes nothing; sockets in another room keep working",
        figure=f"delete to closed: p50 {took['p50_ms']} ms, max {took['max_ms']} ms; {sorted(ended)}; not the creator: "
               f"{not_owner}; controls still working: {sum(controls)} of {len(controls)}",
        delays=took, workers=spread_over,
    )
    assert not_owner == 403 and untouched
    assert ended == {("room_deleted", 4404)}, ended
    assert took["max_ms"] <= WITHIN * 1000, took
    assert all(controls), controls
    assert not log_problems(a.log() + b.log())


RECHECK = 2.0


def test_the_periodic_recheck_catches_what_no_signal_announces(spawn, holders, db, stack):
    """Rows changed with SQL: no signal fires, the re-check (CHAT_SESSION_RECHECK_INTERVAL,
    set to 2 s here; 30 s by default) closes the sockets all the same."""
    gunicorn = spawn(CHAT_SESSION_RECHECK_INTERVAL=str(RECHECK))
    hosts_ = (gunicorn, gunicorn)
    gone, inactive, new_password, keeper = accounts.seed(stack.env, 4)
    room = accounts.room_with_a_message(db.query, keeper.id)
    doomed = accounts.room_with_a_message(db.query, keeper.id)
    cases = {
        "session row deleted": (holders.open(spread(hosts_, room, gone.cookie(), 3, "127.0.4.7")), ("signed_out", 4401)),
        "is_active=false": (holders.open(spread(hosts_, room, inactive.cookie(), 3, "127.0.4.7")), ("account_disabled", 4403)),
        "password column changed": (holders.open(spread(hosts_, room, new_password.cookie(), 3, "127.0.4.7")), ("signed_out", 4401)),
        "room row deleted": (holders.open(spread(hosts_, doomed, keeper.cookie(), 3, "127.0.4.7")), ("room_deleted", 4404)),
    }
    control = holders.open(spread(hosts_, room, keeper.cookie(), 2, "127.0.4.8"))
    assert all(c.accepted for conns, _ in cases.values() for c in conns + control)
    started = time.time()
    db.query("DELETE FROM django_session WHERE session_key = %s RETURNING 1", gone.sessions[0])
    db.query("UPDATE auth_user SET is_active = false WHERE id = %s RETURNING 1", inactive.id)
    db.query("UPDATE auth_user SET password = 'pbkdf2_sha256$1$changed$x' WHERE id = %s RETURNING 1", new_password.id)
    db.query("DELETE FROM chat_message WHERE room_id = %s RETURNING 1", doomed)
    db.query("DELETE FROM chat_room WHERE id = %s RETURNING 1", doomed)
    everyone = [c for conns, _ in cases.values() for c in conns]
    closed_within(holders, everyone, RECHECK + 10)
    figures = {}
    for name, (conns, expected) in cases.items():
        figures[name] = (delays(conns, started)["max_ms"], {c.ended for c in conns}, expected)
    time.sleep(RECHECK)
    controls = [still_works(holders, c) for c in control]
    results.record(
        "revoke-recheck",
        scenario=f"Rows changed with SQL, no signal (CHAT_SESSION_RECHECK_INTERVAL={RECHECK:.0f} s; 30 s by default), 3 sockets each",
        checked="the periodic re-check closes each within one interval (+ its queries): session deleted -> 4401, "
                "is_active=false -> 4403, password changed -> 4401, room deleted -> 4404; another user's sockets keep working",
        figure="; ".join(f"{name}: closed after {ms:.0f} ms max ({sorted(got)[0][0]})" for name, (ms, got, _) in figures.items())
               + f"; controls still working: {sum(controls)} of {len(controls)}",
        closes={name: ms for name, (ms, _, _) in figures.items()},
    )
    for name, (ms, got, expected) in figures.items():
        assert got == {expected}, (name, got)
        assert ms <= (RECHECK + 1.5) * 1000, (name, ms)
    assert all(controls), controls
    assert not log_problems(gunicorn.log())
