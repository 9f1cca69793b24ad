"""Deleting a user always succeeds while that user's messages are being written
(app/chat/migrations/0003_user_fks_on_delete_set_null.py), on a real
PostgreSQL with the interleaving forced (tests/integration/delete_probe.py).

Django's collector nulls a deleted user's messages and rooms itself (UPDATE
... SET author_id = NULL), then DELETEs the user. A message the user's own
script commits in between still references the user: with the foreign key
Django creates (ON DELETE NO ACTION, deferred) the delete then fails at its
commit (the fault suite saw `manage.py shell` exit 1 about once in 10 runs of
tests/faults/test_revocation.py). With ON DELETE SET NULL in the database the
DELETE nulls that row too.

Each test gets a database of its own in the session's PostgreSQL, migrated
with `manage.py migrate` as a release does.
"""
from __future__ import annotations

import json
import secrets
import subprocess
import sys

import psycopg
import pytest

from tests.harness.services import REPO, manage
from tests.harness.stack import app_env

pytestmark = pytest.mark.integration


def admin_url(postgres, database="postgres"):
    return postgres.url.replace("postgres://", "postgresql://").rsplit("/", 1)[0] + "/" + database


@pytest.fixture
def database(postgres, redis):
    """A new, fully migrated database; returns the app's environment for it."""
    name = f"fk_race_{secrets.token_hex(4)}"
    with psycopg.connect(admin_url(postgres), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    env = app_env(redis, postgres)
    env["DATABASE_URL"] = postgres.url.rsplit("/", 1)[0] + "/" + name
    migrate(env)
    yield env
    with psycopg.connect(admin_url(postgres), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def migrate(env, *target):
    result = manage(env, "migrate", "--noinput", "-v0", *target, check=False)
    assert result.returncode == 0, f"manage.py migrate {' '.join(target)} failed:\n{result.stdout}\n{result.stderr}"


def probe(env, *args):
    proc = subprocess.run([sys.executable, "-m", "tests.integration.delete_probe", *args], cwd=REPO,
                          env={**env, "DJANGO_SETTINGS_MODULE": "app.settings"}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_plain_delete_keeps_the_users_messages_and_rooms_without_them(database):
    """The positive control: no race, the messages and the room stay, their author/creator NULL."""
    out = probe(database, "plain")
    assert out == {"delete": "ok", "authors": [None, None], "other_author_kept": True, "room_created_by": None,
                   "user_exists": False}, out


@pytest.mark.parametrize("what", ["message", "room"])
def test_a_row_committed_between_djangos_update_and_delete_does_not_fail_the_delete(database, what):
    """The user's script commits a message (through the batch writer) or a room
    after the collector nulled the user's rows and before it deletes the user."""
    out = probe(database, "between", what)
    table = {"message": "chat_message", "room": "chat_room"}[what]
    # the interleaving really was the race's: the collector's UPDATE ran before the row was written
    assert any(s.startswith(f'UPDATE "{table}" SET') for s in out["statements"]), out["statements"]
    assert out["write"] == "ok", out
    assert out["delete"] == "ok", out
    assert out["user_exists"] is False
    assert out["row"] == {"exists": True, "reference": None}, out  # kept, without its author / creator


def test_a_batch_racing_an_uncommitted_delete_fails_only_for_that_user(database):
    """The other order: the batch's foreign-key check waits on the delete's
    lock, then fails; the writer retries row by row, so only the deleted
    user's message fails and the other user's, in the same batch, is stored."""
    out = probe(database, "uncommitted")
    assert out["delete"] == "ok", out
    assert out["batch_waited_on_the_delete"] is True, out
    assert out["deleted_users_message"].startswith("IntegrityError"), out
    assert out["other_users_message"] == "ok", out
    assert out["stored"] == ["from another user"], out
    assert any("one by one" in line for line in out["log"]), out["log"]  # one batch, then row by row


def test_the_migration_sets_on_delete_set_null_and_its_reverse_restores_djangos_constraint(database):
    """Forward: ON DELETE SET NULL ('n'), still DEFERRABLE INITIALLY DEFERRED.
    Reverse: Django's own constraint (NO ACTION, 'a'), under which the forced
    race fails the delete again (this test's race can fail), then forward again."""
    keys = ("chat_message.author_id", "chat_room.created_by_id")
    assert probe(database, "constraints") == {k: [["n", True, True, "auth_user"]] for k in keys}
    migrate(database, "chat", "0002")
    try:
        assert probe(database, "constraints") == {k: [["a", True, True, "auth_user"]] for k in keys}
        for what in ("message", "room"):
            out = probe(database, "between", what)
            assert out["write"] == "ok", out
            assert out["delete"].startswith("IntegrityError"), out
            assert out["user_exists"] is True, out
    finally:
        migrate(database, "chat")
    assert probe(database, "constraints") == {k: [["n", True, True, "auth_user"]] for k in keys}


def test_the_models_and_the_migrations_agree(database):
    result = manage(database, "makemigrations", "--check", "--dry-run", check=False)
    assert result.returncode == 0, result.stdout + result.stderr
