"""Drive app/chat/writer.py against a real database, in a process of its own.

Run by tests/integration/test_ordering.py with the production settings and
the test stack's DATABASE_URL (`python -m tests.integration.writer_probe CMD
ARGS`); prints one JSON object. Commands:

  poison  - one batch: good messages in two rooms plus one for a room deleted
            meanwhile and one by an author deleted meanwhile. Reports what
            each sender got and what was stored.
  hammer ROOM_IDS N - N batches, each with several messages for each of the
            rooms in a random order (concurrent probes lock rooms in
            different orders: a deadlock would show here). Reports the seqs.
  own_connection ROOM_ID - with the ORM thread's insert replaced by one that
            fails: messages stored, then the writer's connection ended by
            the server (pg_terminate_backend, from another connection), then
            more messages. Reports the seqs, the writer connection's backend
            pids and what each store raised.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import secrets
import sys
import time


def setup():
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "app.settings")
    import django

    django.setup()


class Count(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


async def poison():
    from channels.db import database_sync_to_async
    from django.contrib.auth.models import User

    from app.chat.models import Message, Room
    from app.chat.writer import store_message

    tag = secrets.token_hex(4)

    @database_sync_to_async
    def prepare():
        users = [User.objects.create_user(f"probe-{tag}-{n}", password=secrets.token_urlsafe()) for n in range(3)]
        rooms = [Room.objects.create(name=f"probe {tag} {n}") for n in range(3)]
        gone_room, gone_user = rooms[2].pk, users[2].pk
        rooms[2].delete()
        users[2].delete()
        return [u.pk for u in users[:2]], [r.pk for r in rooms[:2]], gone_room, gone_user

    (alice, bob), (lobby, other), gone_room, gone_user = await prepare()
    handler = Count()
    logging.getLogger("app.chat.writer").addHandler(handler)
    sends = [(lobby, alice, "before"), (gone_room, alice, "for a deleted room"), (other, bob, "unrelated"),
             (lobby, gone_user, "by a deleted author"), (lobby, bob, "after")]
    results = await asyncio.gather(*(store_message(*s) for s in sends), return_exceptions=True)

    @database_sync_to_async
    def stored():
        return sorted(Message.objects.filter(room_id__in=[lobby, other]).values_list("room_id", "seq", "body"))

    return {
        "results": {text: (type(r).__name__ if isinstance(r, BaseException) else r.seq) for (_, _, text), r in zip(sends, results)},
        "stored": [[("lobby" if room == lobby else "other"), seq, body] for room, seq, body in await stored()],
        "log": handler.lines,
    }


async def hammer(room_ids, batches):
    from app.chat.writer import store_message

    failures = {}
    seqs = {r: [] for r in room_ids}
    for _ in range(batches):
        plan = [r for r in room_ids for _ in range(random.randint(1, 4))]
        random.shuffle(plan)
        results = await asyncio.gather(*(store_message(r, None, "hammer") for r in plan), return_exceptions=True)
        for room, result in zip(plan, results):
            if isinstance(result, BaseException):
                failures[type(result).__name__] = failures.get(type(result).__name__, 0) + 1
            else:
                seqs[room].append(result.seq)
    return {"seqs": seqs, "failures": failures}


async def own_connection(room_id):
    import psycopg
    from channels.db import database_sync_to_async

    from app.chat import writer

    def no_thread_hop(*args, **kwargs):
        raise AssertionError("the ORM thread's insert was used")

    writer._insert = no_thread_hop

    async def store(n):
        results = await asyncio.gather(*(writer.store_message(room_id, None, f"own {i}") for i in range(n)),
                                       return_exceptions=True)
        return [type(r).__name__ if isinstance(r, BaseException) else r.seq for r in results]

    def the_writer():
        return writer._writers[asyncio.get_running_loop()].postgres.conn

    first = await store(3)
    pid_before = the_writer().info.backend_pid

    @database_sync_to_async
    def terminate(pid):
        with psycopg.connect(autocommit=True, **writer.connect_params()) as other:
            other.execute("SELECT pg_terminate_backend(%s)", (pid,))
            for _ in range(100):  # until the backend is gone
                if not other.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone():
                    return
                time.sleep(0.05)

    await terminate(pid_before)
    second = await store(2)
    return {"first": first, "second": second, "pid_before": pid_before, "pid_after": the_writer().info.backend_pid}


def main(argv):
    setup()
    if argv[0] == "poison":
        out = asyncio.run(poison())
    elif argv[0] == "own_connection":
        out = asyncio.run(own_connection(int(argv[1])))
    elif argv[0] == "hammer":
        out = asyncio.run(hammer([int(r) for r in argv[1].split(",")], int(argv[2])))
    else:
        raise SystemExit(f"unknown command {argv[0]!r}")
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
