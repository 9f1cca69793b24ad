"""Accounts and sessions made straight in the stack's database, and changes
made to them from another process, as an operator would (`manage.py shell`).

Signing up over HTTP costs a password hash each (about half a second) and the
shared stack's sign-up budget for 127.0.0.1 (CHAT_ADDRESS_SIGNUPS_PER_HOUR):
scenarios that need tens of users get them here, each with database sessions
exactly like the ones a login writes (user id, backend, session auth hash).
"""
from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field

from tests.harness.services import manage

SEED = r"""
import json
from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY, get_user_model
from django.contrib.sessions.backends.db import SessionStore
User = get_user_model()
out = []
for i in range({n}):
    user = User.objects.create_user("seed-{tag}-%d" % i, password=None)  # unusable: no hashing cost
    keys = []
    for _ in range({sessions}):
        s = SessionStore()
        s[SESSION_KEY] = str(user.pk)
        s[BACKEND_SESSION_KEY] = "django.contrib.auth.backends.ModelBackend"
        s[HASH_SESSION_KEY] = user.get_session_auth_hash()
        s.create()
        keys.append(s.session_key)
    out.append({{"id": user.pk, "username": user.username, "sessions": keys}})
print("SEEDED " + json.dumps(out))
"""


@dataclass
class Account:
    id: int
    username: str
    sessions: list[str] = field(default_factory=list)

    def cookie(self, n: int = 0) -> str:
        return f"sessionid={self.sessions[n]}"


def shell(env: dict, code: str, what: str):
    """`manage.py shell -c code` in the database of `env`; a failure says why
    (its exit status, stdout and stderr), not just "exit status 1"."""
    result = manage(env, "shell", "-c", code, check=False, timeout=120)
    if result.returncode != 0:
        raise AssertionError(f"the operator's manage.py shell ({what}) exited {result.returncode}\n"
                             f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}")
    return result


def seed(env: dict, n: int, sessions: int = 1) -> list[Account]:
    """`n` new users with `sessions` database sessions each, in the database of `env`."""
    result = shell(env, SEED.format(n=n, sessions=sessions, tag=secrets.token_hex(3)), f"seed {n} users")
    line = next(line for line in result.stdout.splitlines() if line.startswith("SEEDED "))
    return [Account(**row) for row in json.loads(line[len("SEEDED "):])]


CHANGE = r"""
import time
from django.contrib.auth import get_user_model
user = get_user_model().objects.get(pk={user_id})
{prepare}
print("BEFORE %.6f" % time.time())
{commit}
print("CHANGED %.6f" % time.time())
"""

# what -> (prepared before the clock starts, the statement that commits it)
CHANGES = {
    "password": ('user.set_password("a-new-password-" + "x" * 12)', "user.save()"),  # hashing is not the change
    "deactivate": ("user.is_active = False", "user.save()"),
    "delete": ("pass", "user.delete()"),
}


def change(env: dict, user_id: int, what: str) -> tuple[float, float]:
    """Apply CHANGES[what] to a user in a separate process, as an operator's
    shell would (its signals fire there and publish through the channel layer
    of `env`); returns the wall-clock times just before the change and after
    it committed."""
    result = shell(env, CHANGE.format(user_id=user_id, prepare=CHANGES[what][0], commit=CHANGES[what][1]),
                   f"{what} user {user_id}")
    stamps = {line.split()[0]: float(line.split()[1]) for line in result.stdout.splitlines()
              if line.startswith(("BEFORE ", "CHANGED "))}
    return stamps["BEFORE"], stamps["CHANGED"]


def now() -> float:
    return time.time()


def room_with_a_message(query, owner_id: int) -> int:
    """A new room owned by `owner_id` holding one message (seq 1), written as the
    app writes them: holders.Holders reads that message as "accepted"."""
    (room_id,) = query("INSERT INTO chat_room (name, created_by_id, created_at, last_seq) "
                       "VALUES (%s, %s, now(), 1) RETURNING id", f"room {secrets.token_hex(4)}", owner_id)[0]
    query("INSERT INTO chat_message (room_id, author_id, body, created_at, seq) VALUES (%s, %s, 'first', now(), 1) "
          "RETURNING id", room_id, owner_id)
    return room_id
