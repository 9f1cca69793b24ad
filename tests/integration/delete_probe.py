"""Delete a user while that user's messages (or rooms) are being written, with
the interleaving forced, against a real PostgreSQL, in a process of its own.

Run by tests/integration/test_user_delete_race.py with the production settings
and a test database's DATABASE_URL (`python -m tests.integration.delete_probe
CMD ARGS`); prints one JSON object. Django's deletion collector runs in this
process's main thread: it sets the user's references to NULL (UPDATE ...
SET author_id = NULL), then DELETEs the user, then commits. A query wrapper
(`connection.execute_wrapper`, this probe only) stops it at a chosen point
while another thread, on its own connection, writes as the app writes:

  plain          - no race: a user with messages and a room is deleted; the
                   positive control.
  between WHAT   - after the collector's UPDATEs, just before its DELETE: the
                   other thread commits a message by the user (WHAT=message,
                   through app/chat/writer.py) or a room created by the user
                   (WHAT=room). The delete must still succeed, the new row
                   kept with a NULL author / creator.
  uncommitted    - after the DELETE, before the commit: the other thread's
                   batch (one message by the user being deleted, one by
                   another user) waits on the delete's lock, then fails; the
                   writer retries row by row, so only the deleted user's
                   message fails.
  constraints    - the ON DELETE action and deferrability of the two foreign
                   keys to the user table.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import secrets
import sys
import threading
import time


def setup():
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "app.settings")
    import django

    django.setup()


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def outcome(result):
    if isinstance(result, BaseException):
        return f"{type(result).__name__}: {str(result).splitlines()[0] if str(result) else ''}"
    return "ok"


def in_thread(fn):
    """Run `fn` on a thread of its own (so on a database connection of its
    own), wait for it, and return what it returned or raised."""
    box = {}

    def run():
        from django.db import connections
        try:
            box["result"] = fn()
        except BaseException as exc:  # reported, not raised: the probe prints it
            box["result"] = exc
        finally:
            connections.close_all()

    thread = threading.Thread(target=run)
    thread.start()
    return thread, box


def people(tag, n):
    from django.contrib.auth.models import User
    return [User.objects.create_user(f"del-{tag}-{k}", password=None) for k in range(n)]


def delete_with_hook(user, before_delete=None, after_delete=None):
    """user.delete() with callbacks around the collector's DELETE of the user
    row; returns (what delete() raised or "ok", the statements it ran)."""
    from django.db import connection

    table = type(user)._meta.db_table
    delete_user = re.compile(rf'^DELETE FROM "{table}" WHERE')
    statements = []

    def wrapper(execute, sql, params, many, context):
        statements.append(" ".join(sql.split()[:6]))
        hit = bool(delete_user.match(sql))
        if hit and before_delete:
            before_delete()
        result = execute(sql, params, many, context)
        if hit and after_delete:
            after_delete()
        return result

    try:
        with connection.execute_wrapper(wrapper):
            user.delete()
    except Exception as exc:
        return outcome(exc), statements
    return "ok", statements


def plain():
    from app.chat.models import Message, Room

    tag = secrets.token_hex(4)
    (doomed, other) = people(tag, 2)
    room = Room.objects.create(name=f"del {tag}", created_by=doomed)
    mine = [Message.objects.create(room=room, author=doomed, body=f"mine {k}") for k in range(2)]
    theirs = Message.objects.create(room=room, author=other, body="theirs")
    deleted, statements = delete_with_hook(doomed)
    room.refresh_from_db()
    return {
        "delete": deleted,
        "authors": [Message.objects.get(pk=m.pk).author_id for m in mine],
        "other_author_kept": Message.objects.get(pk=theirs.pk).author_id == other.pk,
        "room_created_by": room.created_by_id,
        "user_exists": type(doomed).objects.filter(pk=doomed.pk).exists(),
    }


def between(what):
    """Commit a row referencing the user between the collector's UPDATE and its DELETE."""
    from app.chat.models import Message, Room
    from app.chat.writer import store_message

    tag = secrets.token_hex(4)
    (doomed, other) = people(tag, 2)
    room = Room.objects.create(name=f"del {tag}", created_by=other)  # not the user's: its row is not locked
    Message.objects.create(room=room, author=doomed, body="before")
    made = {}

    def write():
        if what == "message":
            return asyncio.run(store_message(room.pk, doomed.pk, "sent while being deleted")).pk
        return Room.objects.create(name=f"del {tag} late", created_by_id=doomed.pk).pk

    def commit_a_row():
        thread, box = in_thread(write)
        thread.join(30)
        made["result"] = box.get("result", TimeoutError("the writer did not finish in 30 s"))

    deleted, statements = delete_with_hook(doomed, before_delete=commit_a_row)
    written = made["result"]
    if isinstance(written, int):
        model = Message if what == "message" else Room
        row = model.objects.filter(pk=written).values().first()
        kept = {"exists": row is not None,
                "reference": row and row["author_id" if what == "message" else "created_by_id"]}
    else:
        kept = {"error": outcome(written)}
    return {
        "delete": deleted,
        "write": outcome(written),
        "row": kept,
        "user_exists": type(doomed).objects.filter(pk=doomed.pk).exists(),
        "statements": statements,
    }


def uncommitted(database_url):
    """A batch that races a delete not yet committed: it waits on the
    delete's lock, then the deleted user's message fails, the other's is stored."""
    import psycopg

    from app.chat.models import Message, Room
    from app.chat.writer import store_message

    tag = secrets.token_hex(4)
    (doomed, other) = people(tag, 2)
    room = Room.objects.create(name=f"del {tag}", created_by=other)
    lines = Lines()
    logging.getLogger("app.chat.writer").addHandler(lines)
    running = {}

    async def batch():  # gathered on one loop: one batch of two
        return await asyncio.gather(store_message(room.pk, doomed.pk, "from the deleted user"),
                                    store_message(room.pk, other.pk, "from another user"), return_exceptions=True)

    def start_batch_and_wait_until_it_waits():
        running["thread"], running["box"] = in_thread(lambda: asyncio.run(batch()))
        url = database_url.replace("postgres://", "postgresql://", 1)
        with psycopg.connect(url, autocommit=True) as watch:
            deadline = time.monotonic() + 20
            while True:
                waiting = watch.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                        "AND datname = current_database()").fetchone()[0]
                if waiting or not running["thread"].is_alive():
                    running["waited"] = bool(waiting)
                    return
                if time.monotonic() > deadline:
                    running["waited"] = False
                    return
                time.sleep(0.02)

    deleted, statements = delete_with_hook(doomed, after_delete=start_batch_and_wait_until_it_waits)
    running["thread"].join(30)
    mine, theirs = running["box"].get("result", [TimeoutError("batch hung")] * 2)
    return {
        "delete": deleted,
        "batch_waited_on_the_delete": running["waited"],
        "deleted_users_message": outcome(mine),
        "other_users_message": outcome(theirs),
        "stored": sorted(Message.objects.filter(room=room).values_list("body", flat=True)),
        "log": lines.lines,
    }


def constraints():
    from django.db import connection

    from app.chat.models import Message, Room

    out = {}
    with connection.cursor() as cursor:
        for model, field in ((Message, "author"), (Room, "created_by")):
            column = model._meta.get_field(field).column
            cursor.execute(
                "SELECT con.confdeltype, con.condeferrable, con.condeferred, con.confrelid::regclass::text "
                "FROM pg_constraint con JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = ANY (con.conkey) "
                "WHERE con.contype = 'f' AND con.conrelid = %s::regclass AND a.attname = %s",
                [model._meta.db_table, column])
            out[f"{model._meta.db_table}.{column}"] = [list(row) for row in cursor.fetchall()]
    return out


def main(argv):
    setup()
    if argv[0] == "plain":
        out = plain()
    elif argv[0] == "between":
        out = between(argv[1])
    elif argv[0] == "uncommitted":
        out = uncommitted(os.environ["DATABASE_URL"])
    elif argv[0] == "constraints":
        out = constraints()
    else:
        raise SystemExit(f"unknown command {argv[0]!r}")
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
