"""Settings come from the environment; bad or missing ones stop start-up
with a message naming the variable (checked in real subprocesses)."""
import os
import secrets
import subprocess
import sys

import pytest

from tests.harness.services import REPO

GOOD = {
    "DEBUG": "False",
    "SECRET_KEY": secrets.token_urlsafe(50),
    "ALLOWED_HOSTS": "chat.example.com",
    "DATABASE_URL": "postgres://u:p@127.0.0.1:1/db",
    "REDIS_URL": "redis://127.0.0.1:1/0",
}
PRINT = "import django; django.setup(); from django.conf import settings as s; print(repr({}))"


def run(env_changes, code="import app.settings", cmd=None):
    env = {k: v for k, v in os.environ.items() if k not in GOOD and not k.startswith("DJANGO")}
    env.update({k: v for k, v in env_changes.items() if v is not None})
    env["DJANGO_SETTINGS_MODULE"] = "app.settings"
    return subprocess.run(cmd or [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("missing", ["SECRET_KEY", "ALLOWED_HOSTS", "DATABASE_URL", "REDIS_URL"])
def test_required_in_production(missing):
    result = run({**GOOD, missing: None}, cmd=[sys.executable, "manage.py", "check"])
    assert result.returncode != 0
    assert f"Configuration error: {missing} is required" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "name, value",
    [("DEBUG", "maybe"), ("WEB_CONCURRENCY", "two"), ("CHANNEL_LAYER", "memory"), ("REDIS_URL", "http://x"),
     ("DATABASE_URL", "nonsense://x"), ("SECURE_HSTS_SECONDS", "-1"), ("CHAT_HISTORY", "0"),
     ("LISTEN_ADDRESS", "localhost:80")],
)
def test_bad_values_are_named_by_gunicorn_at_start(name, value):
    gunicorn = os.path.join(os.path.dirname(sys.executable), "gunicorn")
    result = run({**GOOD, name: value, "PORT": "1"}, cmd=[gunicorn])
    assert result.returncode != 0
    assert name in result.stdout + result.stderr
    assert "Booting worker" not in result.stdout + result.stderr  # stopped in the master, before any worker


def test_debug_defaults_to_false_and_daphne_only_with_debug():
    out = run({**GOOD, "DEBUG": None}, PRINT.format("(s.DEBUG, s.INSTALLED_APPS[0])"))
    assert out.stdout.strip() == "(False, 'django.contrib.admin')", out.stderr
    out = run({"DEBUG": "True"}, PRINT.format("(s.DEBUG, s.INSTALLED_APPS[0], s.CHANNEL_LAYERS['default']['BACKEND'])"))
    assert out.stdout.strip() == "(True, 'daphne', 'channels.layers.InMemoryChannelLayer')", out.stderr


def test_channel_layer_backends_and_tls_opt_in():
    out = run(GOOD, PRINT.format("s.CHANNEL_LAYERS['default']"))
    assert "RedisPubSubChannelLayer" in out.stdout and "ssl_cert_reqs" not in out.stdout
    out = run({**GOOD, "CHANNEL_LAYER": "core"}, PRINT.format("s.CHANNEL_LAYERS['default']['BACKEND']"))
    assert out.stdout.strip() == "'channels_redis.core.RedisChannelLayer'"
    out = run({**GOOD, "REDIS_URL": "rediss://h:6380", "REDIS_TLS_INSECURE": "True"}, PRINT.format("s.CHANNEL_LAYERS['default']['CONFIG']"))
    assert "'ssl_cert_reqs': 'none'" in out.stdout


def test_production_requirements_have_no_daphne_nor_test_tools():
    names = {line.split("==")[0].lower() for line in (REPO / "requirements.txt").read_text().splitlines() if "==" in line}
    assert not names & {"daphne", "pytest", "pytest-testinfra", "playwright", "twisted"}
    assert {"gunicorn", "uvicorn", "uvicorn-worker", "channels-redis", "django"} <= names


def test_check_deploy_passes_with_production_settings():
    result = run(GOOD, cmd=[sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"])
    assert result.returncode == 0, result.stdout + result.stderr
