"""The production stack on this machine: Redis, PostgreSQL and the gunicorn
contract with DEBUG=False and 2 workers, from a venv with the production lock
only (no daphne there to import)."""
from __future__ import annotations

from dataclasses import dataclass

from tests.harness.services import Gunicorn, PostgresServer, RedisServer, free_port, manage, production_env

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
    return production_env(redis.url, postgres.url, port, **extra)


def prepare_database(env: dict):
    """The release step (collectstatic is the build step, done when the release is staged)."""
    result = manage(env, "migrate", "--noinput", "-v0", check=False)
    assert result.returncode == 0, f"manage.py migrate failed:\n{result.stdout}\n{result.stderr}"


def start_stack(redis: RedisServer, postgres: PostgresServer, **extra) -> Stack:
    env = app_env(redis, postgres, **extra)
    prepare_database(env)
    return Stack(redis, postgres, Gunicorn(env).start(), env)
