"""Fixtures for the fault and abuse suites: the real production stack.

Every scenario runs gunicorn (2 Uvicorn workers, DEBUG=False) from the repo
root against a private Redis and PostgreSQL on 127.0.0.1 (tests/harness).
Users are signed up once on the shared `stack`; other gunicorn instances get
the same SECRET_KEY and database, so those sessions are valid everywhere.

Figures go to tests/faults/results/latest.json and a table is printed at the
end of the run (see results.py).
"""
from __future__ import annotations

import re
import secrets

import psycopg
import pytest

from tests.faults import results
from tests.harness import chat_client as cc
from tests.harness.services import Gunicorn, RedisServer
from tests.harness.stack import app_env

pytestmark = pytest.mark.integration


def cookie_header(user) -> str:
    return "; ".join(f"{k}={v}" for k, v in user.cookies.items())


@pytest.fixture(scope="session")
def endpoint(stack):
    return cc.endpoint(stack.url)


@pytest.fixture(scope="session")
def users(endpoint):
    """A few real accounts (sign-up over HTTP); many sockets share each session."""
    return [cc.new_user(endpoint) for _ in range(6)]


@pytest.fixture(scope="session")
def make_room(users):
    def make() -> int:
        return cc.create_room(users[0])

    return make


@pytest.fixture(scope="session")
def db(postgres):
    def stored_ids(room_ids) -> dict[int, set[int]]:
        with psycopg.connect(postgres.url.replace("postgres://", "postgresql://"), autocommit=True) as conn:
            rows = conn.execute("SELECT room_id, id FROM chat_message WHERE room_id = ANY(%s)", (list(room_ids),)).fetchall()
        out = {r: set() for r in room_ids}
        for room, mid in rows:
            out[room].add(mid)
        return out

    def query(sql, *args):
        with psycopg.connect(postgres.url.replace("postgres://", "postgresql://"), autocommit=True) as conn:
            return conn.execute(sql, args).fetchall()

    stored_ids.query = query
    return stored_ids


@pytest.fixture(scope="session")
def spawn(stack, postgres):
    """Start another gunicorn on the shared database (same SECRET_KEY) with its
    own Redis unless one is given; everything started is stopped at the end."""
    started = []

    def start(redis: RedisServer | None = None, **extra) -> Gunicorn:
        if redis is None:
            redis = RedisServer().start()
            started.append(redis)
        env = app_env(redis, postgres, SECRET_KEY=stack.env["SECRET_KEY"], **extra)
        gunicorn = Gunicorn(env).start(ready_timeout=60)
        gunicorn.redis = redis
        started.append(gunicorn)
        return gunicorn

    yield start
    for thing in reversed(started):
        try:
            thing.stop()
        except Exception:
            pass


def log_problems(text: str, context: int = 15) -> list[str]:
    """Lines that must never appear in a production log during these scenarios,
    each with the `context` lines after it (a traceback's frames and error), so
    that a failure says what went wrong, not only that something did."""
    bad = []
    lines = text.splitlines()
    for n, line in enumerate(lines):
        # Uvicorn's access line ends with the status ('..." 500'), JSON logs carry "status": 500.
        if ("Traceback" in line or "Exception in ASGI application" in line
                or re.search(r'" 500(\s|$)', line) or re.search(r'"status": ?500\b', line)):
            bad.append("\n".join(lines[max(0, n - 1):n + 1 + context]))
    return bad


def pytest_terminal_summary(terminalreporter):
    table = results.table()
    if table:
        terminalreporter.write_sep("=", "fault and abuse figures")
        terminalreporter.write_line(table)
        terminalreporter.write_line(f"(written to {results.write()})")


def tag() -> str:
    return secrets.token_hex(3)
