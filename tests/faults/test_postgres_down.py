"""PostgreSQL down: /readyz 503, clear error frames, nothing half-written,
and everything recovers when PostgreSQL is back (own PostgreSQL and Redis)."""
from __future__ import annotations

import json
import re
import time
import urllib.request

import psycopg
import pytest
from websockets.exceptions import ConnectionClosed

from tests.faults import results
from tests.faults.conftest import log_problems, tag
from tests.harness import chat_client as cc
from tests.harness.services import Gunicorn, PostgresServer, RedisServer
from tests.harness.stack import app_env, prepare_database

pytestmark = pytest.mark.integration

ERROR = re.compile(r'data-error="([a-z_]+)"')


def readyz(port):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/readyz", headers={"Host": "127.0.0.1"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
    except OSError as e:
        return 0, {"error": str(e)}


@pytest.fixture(scope="module")
def own_stack():
    pg, redis = PostgresServer().start(), RedisServer().start()
    env = app_env(redis, pg)
    prepare_database(env)
    gunicorn = Gunicorn(env).start(ready_timeout=60)
    yield pg, gunicorn
    gunicorn.stop()
    redis.stop()
    pg.cleanup()


def next_frame(ws, timeout):
    return ws.recv(timeout=timeout)


def frames_until(ws, predicate, timeout):
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        try:
            frame = ws.recv(timeout=max(0.05, deadline - time.monotonic()))
        except TimeoutError:
            break
        seen.append(frame)
        if predicate(frame):
            return frame, seen
    raise AssertionError(f"no expected frame within {timeout}s: {[f[:100] for f in seen]}")


def test_postgres_down_gives_503_clear_errors_and_recovers(own_stack):
    pg, gunicorn = own_stack
    ep = cc.endpoint(f"http://127.0.0.1:{gunicorn.port}")
    user = cc.new_user(ep)
    room = cc.create_room(user)
    path = f"/ws/rooms/{room}/"
    run = tag()
    sockets = [ep.websocket(f"{path}?after=0", user.cookies) for _ in range(4)]
    try:
        cc.send(sockets[0], f"before {run}")
        for ws in sockets:
            cc.wait_for_text(ws, f"before {run}")

        t_down = time.monotonic()
        pg.stop()
        deadline = time.monotonic() + 5  # /readyz's result may be up to 1 s old (app/health.py)
        while (answer := readyz(gunicorn.port))[0] == 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        status, body = answer
        readyz_s = time.monotonic() - t_down
        # A page (the session lives in the database): 503 + Retry-After, not a 500.
        started = time.monotonic()
        with ep.client() as client:
            client.cookies.update(user.cookies)
            page = client.get("/", headers=ep.headers())
        page_s = time.monotonic() - started
        # Existing sockets: each message answered with a clear error, socket stays open.
        texts = [f"down {run} {n}" for n in range(len(sockets))]
        error_codes, error_s = [], []
        for ws, text in zip(sockets, texts):
            sent = time.monotonic()
            cc.send(ws, text)
            frame, _ = frames_until(ws, lambda f: "data-error=" in f or "data-msg-id" in f, 30)
            error_codes.append(ERROR.search(frame).group(1) if "data-error=" in frame else "STORED?!")
            error_s.append(time.monotonic() - sent)
        # A new socket: accepted, told why, closed with 1013 (try again later).
        started = time.monotonic()
        fresh = ep.websocket(f"{path}?after=0", user.cookies)
        try:
            frame = fresh.recv(timeout=30)
            with pytest.raises(ConnectionClosed):
                fresh.recv(timeout=30)
            new_close = fresh.close_code
        finally:
            fresh.close()
        new_socket_s = time.monotonic() - started
        new_error = ERROR.search(frame).group(1) if frame and "data-error=" in frame else frame[:200]

        t_up = time.monotonic()
        pg.start()
        ready_after = None
        while time.monotonic() - t_up < 60:
            if readyz(gunicorn.port)[0] == 200:
                ready_after = time.monotonic() - t_up
                break
            time.sleep(0.2)
        # The old sockets still work: a message is stored and fanned out.
        send_ok_after = None
        after_text = f"after {run}"
        while time.monotonic() - t_up < 60:
            cc.send(sockets[1], after_text)
            frame, _ = frames_until(sockets[1], lambda f: "data-error=" in f or after_text in f, 30)
            if after_text in frame:
                send_ok_after = time.monotonic() - t_up
                break
            time.sleep(0.5)
        for ws in sockets[:1] + sockets[2:]:
            cc.wait_for_text(ws, after_text)
        with ep.websocket(f"{path}?after=0", user.cookies) as again:
            cc.wait_for_text(again, after_text)  # the replay works too
        closes = [ws.close_code for ws in sockets]
    finally:
        for ws in sockets:
            ws.close()
    with psycopg.connect(pg.url.replace("postgres://", "postgresql://")) as conn:
        bodies = [b for (b,) in conn.execute("SELECT body FROM chat_message WHERE room_id = %s", (room,))]
    log = gunicorn.log()
    results.record(
        "postgres_down",
        scenario="PostgreSQL stopped, then started",
        checked="/readyz 503; a page 503 with Retry-After; a message on an open socket gets data-error=not_saved and the socket stays open; "
                "a new socket gets data-error=unavailable + close 1013; nothing stored from the outage; recovery",
        figure=f"/readyz 503 in {readyz_s:.2f} s; page 503 in {page_s:.2f} s; error frame after {max(error_s):.2f} s (max); new socket refused "
               f"with 1013 in {new_socket_s:.2f} s; /readyz 200 {ready_after:.2f} s and first message stored "
               f"{send_ok_after:.2f} s after PostgreSQL was started again (its start-up included)",
        readyz_status=status, readyz_body=body, readyz_s=round(readyz_s, 2), page_status=page.status_code,
        page_s=round(page_s, 2), error_codes=error_codes,
        error_max_s=round(max(error_s), 2), new_socket={"error": new_error, "close": new_close, "s": round(new_socket_s, 2)},
        ready_after_s=ready_after, send_ok_after_s=send_ok_after,
    )
    assert status == 503 and body["checks"]["database"] != "ok", body
    assert page.status_code == 503 and page.headers.get("retry-after") == "5", (page.status_code, page.headers)
    assert "Temporarily unavailable" in page.text, page.text[:300]
    assert "database unavailable, answered 503: GET /" in log, log[-2000:]
    assert error_codes == ["not_saved"] * len(sockets), error_codes
    assert new_error == "unavailable" and new_close == 1013, (new_error, new_close)
    assert closes == [None] * len(sockets), f"open sockets were closed: {closes}"
    assert not [b for b in bodies if b.startswith("down ")], "a message was stored while PostgreSQL was down?!"
    assert bodies.count(f"before {run}") == 1 and bodies.count(after_text) >= 1
    assert ready_after is not None and send_ok_after is not None
    assert not log_problems(log), "\n".join(log_problems(log)[:20])
    assert "1011" not in log
