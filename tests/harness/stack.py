"""The production stack on this machine: Redis, PostgreSQL and the gunicorn
contract with DEBUG=False, 2 workers, and daphne made unimportable."""
from __future__ import annotations

from dataclasses import dataclass

from tests.harness.services import REPO, Gunicorn, PostgresServer, RedisServer, free_port, manage, production_env

NO_DAPHNE = str(REPO / "tests" / "harness" / "no_daphne")


@dataclass
class Stack:
    redis: RedisServer
    postgres: PostgresServer
    gunicorn: Gunicorn
    env: dict

    @property
    def port(self) -> int:
        return self.gunicorn.port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.gunicorn.stop()


def app_env(redis: RedisServer, postgres: PostgresServer, port: int | None = None, **extra) -> dict:
    port = port or free_port()
    env = production_env(redis.url, postgres.url, port, **extra)
    env["PYTHONPATH"] = NO_DAPHNE
    return env


def prepare_database(env: dict):
    for command in (("collectstatic", "--noinput", "-v0"), ("migrate", "--noinput", "-v0")):
        result = manage(env, *command, check=False)
        assert result.returncode == 0, f"manage.py {command[0]} failed:\n{result.stdout}\n{result.stderr}"


def start_stack(redis: RedisServer, postgres: PostgresServer, **extra) -> Stack:
    env = app_env(redis, postgres, **extra)
    prepare_database(env)
    return Stack(redis, postgres, Gunicorn(env).start(), env)
