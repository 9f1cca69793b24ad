"""The production stack for the benchmark, for any checkout (`--repo`).

Reuses the integration tests' services (tests/harness/services.py): a private
Redis and PostgreSQL on 127.0.0.1, and the runtime contract (a bare `gunicorn`
in the staged release of the checkout, DEBUG=False, from the production lock's venv, run as
`nobody` when root). The only difference from tests/harness/stack.py is that the checkout
is a parameter, so a worktree with changed app code can be measured against
the same generator.
"""
from __future__ import annotations

import json
import os
import resource
import secrets
import subprocess
import tempfile
import time
from pathlib import Path

from tests.harness import prod_venv, release
from tests.harness.services import Gunicorn, PostgresServer, RedisServer, free_port, manage, production_env

SEED_SCRIPT = r"""
import json, os, sys
import django
django.setup()
from datetime import timedelta
from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY, get_user_model
from django.contrib.sessions.backends.db import SessionStore
from django.contrib.sessions.models import Session
from django.utils import timezone
from django.utils.crypto import get_random_string
from app.chat.models import Room

users_wanted, rooms_wanted, tag = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
User = get_user_model()
users = User.objects.bulk_create(
    [User(username=f"bench-{tag}-{i}", password="!bench-unusable") for i in range(users_wanted)], batch_size=2000)
rooms = Room.objects.bulk_create([Room(name=f"bench {tag} {i}") for i in range(rooms_wanted)], batch_size=2000)
store = SessionStore()
expire = timezone.now() + timedelta(days=1)
chars = "abcdefghijklmnopqrstuvwxyz0123456789"
sessions = []
for user in users:
    data = {SESSION_KEY: str(user.pk), BACKEND_SESSION_KEY: "django.contrib.auth.backends.ModelBackend",
            HASH_SESSION_KEY: user.get_session_auth_hash()}
    sessions.append(Session(session_key=get_random_string(32, chars), session_data=store.encode(data), expire_date=expire))
Session.objects.bulk_create(sessions, batch_size=2000)
json.dump({"sessions": [s.session_key for s in sessions], "rooms": [r.pk for r in rooms]}, sys.stdout)
"""


def raise_nofile(want: int = 1 << 20) -> int:
    """Raise this process's open-file limit (children inherit it) as far as allowed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else want
    target = min(target, want) if hard == resource.RLIM_INFINITY else target
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class Services:
    """Redis + PostgreSQL, shared by every configuration of one run."""

    def __init__(self):
        self.redis = RedisServer().start()
        self.postgres = PostgresServer().start()
        # One key for the whole run: the seeded sessions stay valid across restarts.
        self.secret_key = secrets.token_urlsafe(50)

    def flush_redis(self):
        subprocess.run(["redis-cli", "-p", str(self.redis.port), "FLUSHALL"], check=True, capture_output=True)

    def stop(self):
        self.redis.stop()
        self.postgres.cleanup()


class AppStack:
    """One gunicorn of one checkout with one configuration."""

    def __init__(self, services: Services, repo: Path, workers: int, layer: str, extra_env: dict | None = None,
                 log_dir: Path | None = None):
        self.services, self.repo = services, Path(repo).resolve()
        # The checkout as a release `nobody` can read, wherever it lives (tests/harness/release.py).
        self.release = release.stage(self.repo)
        self.port = free_port()
        env = production_env(services.redis.url, services.postgres.url, self.port,
                             WEB_CONCURRENCY=workers, CHANNEL_LAYER=layer, SECRET_KEY=services.secret_key,
                             # thousands of clients from one address: the per-address
                             # handshake limit is not what the benchmark measures
                             CHAT_ADDRESS_HANDSHAKES_PER_MINUTE=10**9)
        env.update({k: str(v) for k, v in (extra_env or {}).items()})
        self.env = env
        self.workers, self.layer = workers, layer
        log_dir = log_dir or Path(tempfile.mkdtemp(prefix="bench-logs-"))
        self.gunicorn = Gunicorn(env, log_dir / f"gunicorn-{layer}-w{workers}-{self.port}.log", cwd=self.release)
        self.ready_seconds = None

    def manage(self, *args, timeout=300):
        result = manage(self.env, *args, check=False, cwd=self.release, timeout=timeout)
        if result.returncode:
            raise RuntimeError(f"manage.py {args[0]} failed:\n{result.stdout}\n{result.stderr}")
        return result

    def prepare(self):
        self.manage("migrate", "--noinput", "-v0")  # collectstatic ran when the release was staged

    def seed(self, users: int, rooms: int) -> dict:
        env = dict(self.env, DJANGO_SETTINGS_MODULE="app.settings")
        env["PYTHONPATH"] = str(self.release)
        result = subprocess.run([str(prod_venv.ensure() / "python"), "-c", SEED_SCRIPT, str(users), str(rooms), secrets.token_hex(3)],
                                cwd=self.release, env=env, capture_output=True, text=True, timeout=300)
        if result.returncode:
            raise RuntimeError(f"seeding failed:\n{result.stderr}")
        return json.loads(result.stdout)

    def start(self, ready_timeout=60.0) -> "AppStack":
        started = time.monotonic()
        self.gunicorn.start(ready_timeout=ready_timeout)
        self.ready_seconds = time.monotonic() - started
        return self

    def stop(self):
        self.gunicorn.stop()

    def pids(self) -> list[int]:
        return [self.gunicorn.proc.pid, *self.gunicorn.worker_pids()]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


# --- process accounting from /proc -------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime
    return total


def machine_busy_seconds() -> float:
    """CPU seconds spent busy on the whole machine (every process, ours or not)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / _TICK


def memory(pids) -> dict:
    """RSS (counts shared pages in every process) and PSS (splits them) in bytes."""
    rss = pss = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
        except OSError:
            continue
    return {"rss": rss, "pss": pss}
