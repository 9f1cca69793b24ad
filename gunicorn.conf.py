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


def _choice(name, default, choices):
    value = os.environ.get(name, "").strip().lower() or default
    if value not in choices:
        sys.exit(f"Configuration error: {name} must be one of {', '.join(choices)}, got {value!r}")
    return value


wsgi_app = "app.asgi:application"
worker_class = "app.uvicorn_worker.ChatUvicornWorker"
# Platforms route to the container's port, so every interface; on a VM nginx is
# on the same host and LISTEN_ADDRESS=127.0.0.1 keeps the app port off the network.
_port = _int("PORT", 8000)
bind = [f"{_address('LISTEN_ADDRESS', '0.0.0.0')}:{_port}"]
workers = _int("WEB_CONCURRENCY", 2)

# Metrics (app/observability/). METRICS_PORT: a second listener that serves
# only /metrics, without a token, for scrapers on a private network (Fly's
# [metrics]; a Prometheus beside the app); it listens on METRICS_ADDRESS,
# by default the app port's address (Fly wants 0.0.0.0; the Ansible role
# gives the host's private address). Every worker serves both listeners.
_metrics_port = _int("METRICS_PORT", None)
_metrics_address = _address("METRICS_ADDRESS", os.environ.get("LISTEN_ADDRESS", "").strip() or "0.0.0.0")
if _metrics_port is not None:
    if _metrics_port > 65535 or _metrics_port == _port:
        sys.exit(f"Configuration error: METRICS_PORT must be a TCP port other than PORT ({_port}), got {_metrics_port}")
    bind.append(f"{_metrics_address}:{_metrics_port}")

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
# LOG_FORMAT=json: one JSON object per line from gunicorn, Uvicorn's access
# and error logs (the workers hand them gunicorn's handlers), Django and the
# chat (app/settings.py LOGGING); plain text otherwise.
_log_format = _choice("LOG_FORMAT", "plain", ("plain", "json"))
if _log_format == "json":
    from app.observability.logs import gunicorn_logconfig

    logconfig_dict = gunicorn_logconfig(_log_format, loglevel)
# Heartbeat files: /tmp is the one writable place on a read-only root.
worker_tmp_dir = os.environ.get("GUNICORN_WORKER_TMP_DIR", "/tmp")

# prometheus_client's multiprocess mode when metrics are on (a token or a
# metrics port): each worker writes its values to files in this directory
# and a scrape sums them. Set here, in the master, so that every worker
# inherits it before it imports prometheus_client (app/observability/multiproc.py).
_metrics_on = bool(os.environ.get("METRICS_TOKEN", "").strip()) or _metrics_port is not None
if _metrics_on:
    from app.observability import multiproc as _multiproc

    _metrics_dir, _metrics_dir_owned = _multiproc.directory(worker_tmp_dir)
    os.environ[_multiproc.ENV] = _metrics_dir
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
    if _metrics_on:
        # A new instance starts from zero: values left by a previous run are
        # removed (before any worker exists; the master itself counts nothing).
        try:
            _multiproc.prepare(_metrics_dir)
        except OSError as exc:
            server.log.error("Configuration error: %s %s: %s", _multiproc.ENV, _metrics_dir, exc)
            sys.exit(1)
    # Before the workers fork: they share app.probes' "ready once" flag, so
    # /startupz answers the same whichever worker a checker reaches.
    import app.probes  # noqa: F401


def child_exit(server, worker):
    """In the master, for every worker that ended (SIGKILL included): its live
    gauges (open sockets, memory) leave the totals; its counters stay."""
    if _metrics_on:
        _multiproc.worker_died(worker.pid, _metrics_dir)


def worker_exit(server, worker):
    """In the worker, as it ends: the delivery counts it has not written yet."""
    if _metrics_on:
        _multiproc.flush_worker()


def on_exit(server):
    if _metrics_on:
        _multiproc.cleanup(_metrics_dir, _metrics_dir_owned)
