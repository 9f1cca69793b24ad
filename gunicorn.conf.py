"""The production runtime, in one place: every target runs a bare `gunicorn`.

gunicorn reads this file from the working directory by itself, so Procfiles,
systemd units, container commands and manifests say `gunicorn` and nothing
else (a test fails if any of them spells flags of its own).
"""
import os
import sys


def _int(name, default):
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        number = int(value)
    except ValueError:
        sys.exit(f"Configuration error: {name} must be a whole number, got {value!r}")
    if number < 1:
        sys.exit(f"Configuration error: {name} must be at least 1, got {number}")
    return number


wsgi_app = "app.asgi:application"
worker_class = "app.uvicorn_worker.ChatUvicornWorker"
bind = [f"0.0.0.0:{_int('PORT', 8000)}"]
workers = _int("WEB_CONCURRENCY", 2)

# Uvicorn workers answer a heartbeat; `timeout` only kills a stuck worker.
timeout = 30
# SIGTERM: stop accepting, close websockets with 1012 (clients reconnect
# elsewhere), let requests finish. Kubernetes' grace period must exceed this.
graceful_timeout = _int("GUNICORN_GRACEFUL_TIMEOUT", 30)
keepalive = 5

# Platforms put a proxy in front and the app port is not public; on a VM
# with nginx on the same host set FORWARDED_ALLOW_IPS=127.0.0.1.
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "*")

accesslog = "-"
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info").lower()
# Heartbeat files: /tmp is the one writable place on a read-only root.
worker_tmp_dir = os.environ.get("GUNICORN_WORKER_TMP_DIR", "/tmp")
# gunicorn's runtime control socket (gunicornc) defaults to ~/.gunicorn: off,
# so a read-only root works and several instances on one host cannot clash.
control_socket_disable = True


def on_starting(server):
    """Import the settings in the master: a bad variable stops start-up here,
    once, with its name, instead of in every worker as it boots."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "app.settings")
    from app.env import ConfigError

    try:
        import django

        django.setup(set_prefix=False)
    except ConfigError as exc:
        server.log.error("Configuration error: %s", exc)
        sys.exit(1)
