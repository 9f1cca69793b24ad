"""The production runtime, in one place: every target runs a bare `gunicorn`.

gunicorn reads this file from the working directory by itself, so Procfiles,
systemd units, container commands and manifests say `gunicorn` and nothing
else (a test fails if any of them spells flags of its own).
"""
import ipaddress
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


def _address(name, default):
    value = os.environ.get(name, "").strip() or default
    try:
        ipaddress.ip_address(value)
    except ValueError:
        sys.exit(f"Configuration error: {name} must be an IP address (0.0.0.0, 127.0.0.1, ::), got {value!r}")
    return f"[{value}]" if ":" in value else value


wsgi_app = "app.asgi:application"
worker_class = "app.uvicorn_worker.ChatUvicornWorker"
# Platforms route to the container's port, so every interface; on a VM nginx is
# on the same host and LISTEN_ADDRESS=127.0.0.1 keeps the app port off the network.
bind = [f"{_address('LISTEN_ADDRESS', '0.0.0.0')}:{_int('PORT', 8000)}"]
workers = _int("WEB_CONCURRENCY", 2)

# Uvicorn workers answer a heartbeat; `timeout` only kills a stuck worker.
timeout = 30
# SIGTERM: stop accepting, close websockets with 1012 (clients reconnect
# elsewhere), let requests finish. After graceful_timeout the master SIGKILLs
# what is left; each Uvicorn worker gives up on stuck connections 5 s before
# that by itself (app/uvicorn_worker.py). Every platform's kill deadline must
# exceed this: Heroku's fixed 30 s, Render's maxShutdownDelaySeconds, Fly's
# kill_timeout, Kubernetes' grace period minus preStop, systemd's
# TimeoutStopSec (tests/platforms/test_shutdown_windows.py checks each).
graceful_timeout = _int("GUNICORN_GRACEFUL_TIMEOUT", 20)
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
    # Before the workers fork: they share app.probes' "ready once" flag, so
    # /startupz answers the same whichever worker a checker reaches.
    import app.probes  # noqa: F401
