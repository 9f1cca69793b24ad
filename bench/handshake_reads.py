"""Thread CPU of a handshake's database reads: the ORM against plain SQL.

    python -m bench.handshake_reads [--reads N] [--rounds R]

Starts the benchmark's PostgreSQL and Redis (bench/stack.py), migrates and
seeds users with sessions and rooms, then in the production venv with the
production settings times, on one thread (`time.thread_time`), what the
handshake reads for each socket: the session row, the user row and the room
row, each in a database hop of its own as on the worker's database thread
(`close_old_connections` before and after: the pool's get and put).

* `orm`: Django's database SessionStore.load, Channels' get_user (ModelBackend:
  `.get(pk=)`), `Room.objects.filter(pk=).first()`: the code before
  app/chat/handshake_reads.py;
* `plain`: app/chat/handshake_reads.py (the same rows as plain SQL).

The two alternate, R rounds of N reads each; the figure is ms of thread CPU
per handshake. Nothing else runs in the process, so this is the reads' own
cost; under load the database thread also pays for the GIL and the hops.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

from bench.stack import AppStack, Services
from tests.harness import prod_venv

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
import django
django.setup()
from channels.auth import get_user as channels_get_user
from django.contrib.sessions.backends.db import SessionStore as DjangoStore
from django.db import close_old_connections
from app.chat import handshake_reads
from app.chat.models import Room

seed, reads, rounds = json.load(open(sys.argv[1])), int(sys.argv[2]), int(sys.argv[3])
keys, rooms = seed["sessions"], seed["rooms"]

def hop(call, *args):
    close_old_connections()
    try:
        return call(*args)
    finally:
        close_old_connections()

def orm(i):
    user = hop(channels_get_user.func, {"session": DjangoStore(keys[i % len(keys)])})
    room = hop(lambda pk: Room.objects.filter(pk=pk).first(), rooms[i % len(rooms)])
    assert user.is_authenticated and room is not None

def plain(i):
    user = hop(handshake_reads.get_user, {"session": handshake_reads.SessionStore(keys[i % len(keys)])})
    room = hop(handshake_reads.room, Room, rooms[i % len(rooms)])
    assert user.is_authenticated and room is not None

def per_read_ms(fn):
    start = time.thread_time()
    for i in range(reads):
        fn(i)
    return (time.thread_time() - start) / reads * 1000

for fn in (orm, plain):  # warm up: the pool's connections, imports, caches
    for i in range(200):
        fn(i)
out = {"orm": [], "plain": []}
for _ in range(rounds):
    for name, fn in (("orm", orm), ("plain", plain)):
        out[name].append(round(per_read_ms(fn), 3))
print(json.dumps(out))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reads", type=int, default=2000, help="handshakes per round and variant")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    services = Services()
    try:
        stack = AppStack(services, REPO, workers=1, layer="pubsub")
        stack.prepare()
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as seed_file:
            json.dump(stack.seed(users=500, rooms=50), seed_file)
        Path(seed_file.name).chmod(0o644)
        env = dict(stack.env, DJANGO_SETTINGS_MODULE="app.settings", PYTHONPATH=str(stack.release))
        result = subprocess.run([str(prod_venv.ensure() / "python"), "-c", CHILD, seed_file.name, str(args.reads),
                                 str(args.rounds)], cwd=stack.release, env=env, capture_output=True, text=True,
                                timeout=1800)
        Path(seed_file.name).unlink()
        if result.returncode:
            raise SystemExit(f"the timing run failed:\n{result.stderr}")
        figures = json.loads(result.stdout.strip().splitlines()[-1])
    finally:
        services.stop()
    print(f"thread CPU per handshake (session + user + room, two hops), {args.reads} handshakes x {args.rounds} rounds:")
    for name, label in (("orm", "ORM (Django's store, ModelBackend, a queryset)"), ("plain", "plain SQL (app/chat/handshake_reads.py)")):
        values = figures[name]
        print(f"  {label:48s} " + ", ".join(f"{v:.2f}" for v in values) + " ms")


if __name__ == "__main__":
    main()
