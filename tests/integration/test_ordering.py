"""Exactly once whatever order two workers commit and publish in, and a bad
row that fails alone: app/chat/writer.py and the replay against the real
production stack (gunicorn with 2 workers, PostgreSQL, Redis).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from contextlib import ExitStack

import psycopg
import pytest
from websockets.sync.client import connect

from tests.harness import chat_client as cc
from tests.harness.services import REPO
from tests.harness.sockets import server_pid

pytestmark = pytest.mark.integration


def probe(stack, *args, wait=True):
    cmd = [sys.executable, "-m", "tests.integration.writer_probe", *map(str, args)]
    env = {**stack.env, "DJANGO_SETTINGS_MODULE": "app.settings"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return finish(proc) if wait else proc


def finish(proc):
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def pg(stack):
    return psycopg.connect(stack.postgres.url.replace("postgres://", "postgresql://"), autocommit=True)


def test_one_bad_row_fails_alone_on_postgresql(stack):
    """One batch: a message for a room deleted meanwhile and one by an author
    deleted meanwhile (a foreign-key error that fails the batch statement)
    beside three good ones. Only the two bad ones fail."""
    out = probe(stack, "poison")
    assert out["results"] == {"before": 1, "for a deleted room": "RoomGone", "unrelated": 1,
                              "by a deleted author": "IntegrityError", "after": 2}, out
    assert out["stored"] == [["lobby", 1, "before"], ["lobby", 2, "after"], ["other", 1, "unrelated"]], out
    assert any("one by one" in line for line in out["log"]), out["log"]  # it was one batch, then row by row


def test_postgresql_batches_go_on_the_writers_own_connection_which_survives_a_server_goodbye(stack):
    """On PostgreSQL the writer does not use the ORM's thread (the probe makes
    that path fail), and a connection the server ended between two batches
    (pg_terminate_backend) is replaced before the next one: no batch fails."""
    with pg(stack) as conn:
        room = conn.execute("INSERT INTO chat_room (name, created_at, last_seq) VALUES (%s, now(), 0) RETURNING id",
                            (f"own {time.monotonic_ns()}",)).fetchone()[0]
    out = probe(stack, "own_connection", room)
    assert sorted(out["first"]) == [1, 2, 3], out
    assert sorted(out["second"]) == [4, 5], out  # positive: nothing failed after the goodbye
    assert out["pid_after"] != out["pid_before"], out  # a new connection, not the terminated one


def test_concurrent_batches_number_every_room_gap_free(stack):
    """Two processes write batches that each hold several rooms' messages in
    random order: every room's seqs are 1..n, each once, and no batch
    deadlocks (rooms are locked in id order)."""
    with pg(stack) as conn:
        rooms = [conn.execute("INSERT INTO chat_room (name, created_at, last_seq) VALUES (%s, now(), 0) RETURNING id",
                              (f"hammer {time.monotonic_ns()} {n}",)).fetchone()[0] for n in range(4)]
    procs = [probe(stack, "hammer", ",".join(map(str, rooms)), 40, wait=False) for _ in range(2)]
    outs = [finish(p) for p in procs]
    assert all(not o["failures"] for o in outs), [o["failures"] for o in outs]
    with pg(stack) as conn:
        for room in rooms:
            got = sorted(s for o in outs for s in o["seqs"][str(room)])
            assert got == list(range(1, len(got) + 1)), (room, got)
            stored = [r[0] for r in conn.execute("SELECT seq FROM chat_message WHERE room_id = %s ORDER BY seq", (room,))]
            last = conn.execute("SELECT last_seq FROM chat_room WHERE id = %s", (room,)).fetchone()[0]
            assert stored == got and last == len(got)


# --- the out-of-order commit, forced ----------------------------------------

def ws_connect(stack, room, user, after=None):
    query = "" if after is None else f"?after={after}"
    return connect(f"ws://127.0.0.1:{stack.port}/ws/rooms/{room}/{query}", origin=f"https://127.0.0.1:{stack.port}",
                   additional_headers={"Cookie": "; ".join(f"{k}={v}" for k, v in user.cookies.items()),
                                       "X-Forwarded-Proto": "https"}, open_timeout=10, close_timeout=2)


def on_worker(stack, room, user, worker, workers, exits):
    """A socket of `user` in `room` held by the worker process `worker`."""
    seen = []
    for _ in range(40):  # the kernel picks the worker; connect until it is the one
        with ExitStack() as attempt:
            ws = attempt.enter_context(ws_connect(stack, room, user, after=0))
            pid = server_pid(stack.port, ws.socket.getsockname()[1], workers)
            if pid == worker:
                exits.enter_context(attempt.pop_all())
                return ws
            seen.append(pid)
    raise AssertionError(f"no socket landed on worker {worker} in 40 tries: {seen}")


def waiting_on_locks(conn) -> int:
    return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                        "AND datname = current_database() AND pid <> pg_backend_pid()").fetchone()[0]


def read_frames(ws, shown: cc.Shown, until, timeout):
    deadline = time.monotonic() + timeout
    while not until() and time.monotonic() < deadline:
        try:
            shown.apply(ws.recv(timeout=max(0.05, deadline - time.monotonic())))
        except TimeoutError:
            break


def test_a_message_committed_late_still_reaches_a_client_that_reconnected(stack):
    """Alice's message is held back between taking its number and committing
    (the test holds a lock her INSERT needs), while Bob's, sent later through
    the *other* worker, goes through. Carol's page then reconnects while
    Alice's is published, with the cursor her page keeps, and must be shown
    both messages, each once.

    With ids as the cursor (before seq numbers) Bob's id 100 commits and is
    shown before Alice's id 99, Carol reconnects with ?after=100, and 99 is
    never replayed: this test fails. With seqs, Bob's message cannot commit
    before Alice's (the room row's lock), so Carol's cursor never passes it."""
    ep = cc.endpoint(stack.url)
    alice, bob, carol = cc.new_user(ep), cc.new_user(ep), cc.new_user(ep)
    room = cc.create_room(carol)
    workers = stack.gunicorn.worker_pids()
    assert len(workers) == 2
    with ExitStack() as exits, pg(stack) as watch:
        a_ws = on_worker(stack, room, alice, workers[0], workers, exits)
        b_ws = on_worker(stack, room, bob, workers[1], workers, exits)
        carol_ws = exits.enter_context(ws_connect(stack, room, carol, after=0))
        shown = cc.Shown()

        hold = exits.enter_context(psycopg.connect(stack.postgres.url.replace("postgres://", "postgresql://")))
        hold.execute("SELECT id FROM auth_user WHERE username = %s FOR UPDATE", (alice.username,))  # a transaction, held open
        cc.send(a_ws, "alice, held back")
        deadline = time.monotonic() + 10
        while waiting_on_locks(watch) < 1:  # Alice's message has its number and waits to commit
            assert time.monotonic() < deadline, "Alice's INSERT never waited for the held lock"
            time.sleep(0.02)
        cc.send(b_ws, "bob, sent later")
        # Bob's message either commits and reaches Carol (ids) or waits behind Alice's (seqs).
        deadline = time.monotonic() + 10
        while waiting_on_locks(watch) < 2:
            read_frames(carol_ws, shown, lambda: bool(shown.ids), 0.2)
            if shown.ids:
                break
            assert time.monotonic() < deadline, "Bob's message neither arrived nor waited"
        carol_before = dict(shown.ids)
        carol_ws.close()

        hold.rollback()  # Alice's transaction commits now (and Bob's after it, with seqs)
        with_texts = "SELECT count(*) FROM chat_message WHERE room_id = %s AND body IN ('alice, held back', 'bob, sent later')"
        deadline = time.monotonic() + 10
        while watch.execute(with_texts, (room,)).fetchone()[0] < 2:
            assert time.monotonic() < deadline, "the held message was never stored"
            time.sleep(0.05)
        cc.wait_for_text(a_ws, "alice, held back")  # published (Carol is away)
        cc.wait_for_text(b_ws, "bob, sent later")

        stored = {r[0] for r in watch.execute("SELECT id FROM chat_message WHERE room_id = %s", (room,))}
        with ws_connect(stack, room, carol, after=shown.after) as again:
            read_frames(again, shown, lambda: stored <= set(shown.ids), 5)
        assert set(shown.ids) == stored, (f"Carol showed {carol_before} before reconnecting with ?after={shown.after}; "
                                          f"missing after it: {stored - set(shown.ids)}")


def test_the_migration_numbers_existing_messages_per_room(stack):
    """A database from before seq numbers: its messages get 1..n per room in
    id order, each room's last_seq its highest, and new messages go on from there."""
    from tests.harness.services import manage

    name = f"mig_{time.monotonic_ns()}"
    with pg(stack) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        url = stack.postgres.url.rsplit("/", 1)[0] + f"/{name}"
        env = {**stack.env, "DATABASE_URL": url}
        manage(env, "migrate", "--noinput", "-v0")
        manage(env, "migrate", "chat", "0001", "--noinput", "-v0")
        with psycopg.connect(url.replace("postgres://", "postgresql://"), autocommit=True) as conn:
            a, b, empty = [conn.execute("INSERT INTO chat_room (name, created_at) VALUES (%s, now()) RETURNING id",
                                        (n,)).fetchone()[0] for n in "abc"]
            for room in (a, b, a, a, b):
                conn.execute("INSERT INTO chat_message (room_id, body, created_at) VALUES (%s, 'old', now())", (room,))
        manage(env, "migrate", "--noinput", "-v0")
        with psycopg.connect(url.replace("postgres://", "postgresql://"), autocommit=True) as conn:
            rows = conn.execute("SELECT room_id, seq FROM chat_message ORDER BY id").fetchall()
            assert rows == [(a, 1), (b, 1), (a, 2), (a, 3), (b, 2)]
            last = dict(conn.execute("SELECT id, last_seq FROM chat_room").fetchall())
            assert last == {a: 3, b: 2, empty: 0}
    finally:
        with pg(stack) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
