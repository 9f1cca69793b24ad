"""Settings come from the environment; bad or missing ones stop start-up
with a message naming the variable (checked in real subprocesses)."""
import base64
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
     ("LISTEN_ADDRESS", "localhost:80"), ("METRICS_TOKEN", "short"), ("METRICS_TOKEN", "x" * 40),
     ("METRICS_TOKEN", "has spaces " * 4), ("METRICS_PORT", "nine"), ("METRICS_PORT", "1"), ("METRICS_PORT", "70000"),
     ("METRICS_ADDRESS", "private"), ("LOG_FORMAT", "xml")],
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
    assert "app.chat.layer.ChatPubSubChannelLayer" in out.stdout and "ssl_cert_reqs" not in out.stdout
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


# --- unsafe settings refuse to start ---------------------------------------------------

# Render's Blueprint `generateValue: true` is "a base64-encoded 256-bit value"
# (render.com/docs/blueprint-spec): 44 characters, shorter than the 50 that
# Django's security.W009 asks for.
RENDER_KEY = base64.b64encode(os.urandom(32)).decode()
DEV_KEY = "dev-only-insecure-key-never-used-when-DEBUG-is-False-0123456789abcdef"
UNSAFE = [
    ("ALLOWED_HOSTS", "*"),
    ("SECRET_KEY", "short-" + secrets.token_urlsafe(20)),
    ("SECRET_KEY", DEV_KEY),
    ("DATABASE_URL", "sqlite:///db.sqlite3"),
]
# Test ids that do not change between collections (random values would: the
# two xdist workers of `make test` must collect the same ids) and print no key.
UNSAFE_IDS = ["ALLOWED_HOSTS-wildcard", "SECRET_KEY-short", "SECRET_KEY-dev-key", "DATABASE_URL-sqlite"]


@pytest.mark.parametrize("value, weak", [
    (RENDER_KEY, False),
    (secrets.token_hex(32), False),  # e.g. openssl rand -hex 32
    (secrets.token_urlsafe(50), False),
    ("x" * 39 + "abcdefghi", False),
    ("short-" + secrets.token_urlsafe(20), True),
    ("ab" * 40, True),
    ("django-insecure-" + secrets.token_urlsafe(40), True),
    (DEV_KEY, True),
    ("<generate: python3 -c 'import secrets; print(secrets.token_urlsafe(50))'>", True),
], ids=["render-generated", "hex-32", "urlsafe-50", "long-mostly-x", "short", "repeated", "django-insecure", "dev-key",
        "placeholder"])
def test_what_counts_as_a_weak_secret_key(value, weak):
    from app.env import secret_key_problem

    assert (secret_key_problem(value) is not None) is weak


def gunicorn_cmd():
    return [os.path.join(os.path.dirname(sys.executable), "gunicorn")]


@pytest.mark.parametrize("name, value", UNSAFE, ids=UNSAFE_IDS)
def test_unsafe_settings_stop_manage_py_with_one_line(name, value):
    result = run({**GOOD, name: value}, cmd=[sys.executable, "manage.py", "check"])
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Configuration error: {name} "), result.stderr
    if name == "SECRET_KEY":
        assert value not in result.stdout + result.stderr  # a secret is named, never printed


@pytest.mark.parametrize("name, value", [UNSAFE[0], UNSAFE[1], UNSAFE[3]], ids=[UNSAFE_IDS[i] for i in (0, 1, 3)])
def test_unsafe_settings_stop_gunicorns_master(name, value):
    result = run({**GOOD, name: value, "PORT": "1"}, cmd=gunicorn_cmd())
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"Configuration error: {name} " in output
    assert "Booting worker" not in output and "Traceback" not in output


def test_wildcard_host_with_the_opt_in_and_safe_keys_pass_check_deploy():
    for changes in ({"ALLOWED_HOSTS": "chat.example.com,*", "ALLOW_ANY_HOST": "True"},
                    {"SECRET_KEY": RENDER_KEY}):
        result = run({**GOOD, **changes}, cmd=[sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"])
        assert result.returncode == 0, (changes.keys(), result.stdout + result.stderr)


def test_development_keeps_its_conveniences():
    dev = {"DEBUG": "True", "ALLOWED_HOSTS": "*", "SECRET_KEY": "short", "DATABASE_URL": "sqlite:///db.sqlite3"}
    result = run(dev, cmd=[sys.executable, "manage.py", "check"])
    assert result.returncode == 0, result.stderr


def test_gunicorn_boots_with_renders_generated_key():
    """Positive control for the master's refusal: the same command boots workers."""
    import signal
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in GOOD and not k.startswith("DJANGO")}
    env.update(GOOD, SECRET_KEY=RENDER_KEY, PORT=str(port), WEB_CONCURRENCY="1", DJANGO_SETTINGS_MODULE="app.settings")
    proc = subprocess.Popen(gunicorn_cmd(), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = ""
    try:
        deadline = time.monotonic() + 30
        while "Booting worker" not in output and time.monotonic() < deadline and proc.poll() is None:
            output += proc.stdout.readline()
    finally:
        proc.send_signal(signal.SIGINT)  # quick shutdown
        output += proc.communicate(timeout=30)[0]
    assert "Booting worker" in output and "Configuration error" not in output, output


def test_per_user_limits_defaults_and_a_bad_value_named():
    out = run(GOOD, PRINT.format("(s.CHAT_MAX_SOCKETS_PER_USER, s.CHAT_USER_RATE_PER_SECOND, s.CHAT_USER_RATE_BURST, "
                                 "s.CHAT_SESSION_RECHECK_INTERVAL)"))
    assert out.stdout.strip() == "(10, 5.0, 10, 30.0)", out.stderr
    # the backstop cannot be switched off
    out = run({**GOOD, "CHAT_SESSION_RECHECK_INTERVAL": "0"})
    assert out.returncode != 0 and "CHAT_SESSION_RECHECK_INTERVAL" in out.stderr
