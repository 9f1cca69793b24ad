"""Session fixtures for the real production stack (loaded by tests/conftest.py)."""
import pytest

from tests.harness.services import PostgresServer, RedisServer
from tests.harness.stack import start_stack


@pytest.fixture(scope="session")
def postgres():
    server = PostgresServer().start()
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def redis():
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def stack(redis, postgres):
    running = start_stack(redis, postgres)
    yield running
    running.stop()
