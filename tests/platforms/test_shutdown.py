"""A stuck connection cannot hold a worker until SIGKILL (the product image).

uvicorn-worker does not pass gunicorn's graceful_timeout to Uvicorn, whose
default is to wait for open connections forever; app/uvicorn_worker.py sets
Uvicorn's timeout_graceful_shutdown inside it. Here a request whose body
never arrives is open when the container gets SIGTERM: the worker must
cancel it and the whole container exit cleanly before graceful_timeout (when
gunicorn's master would SIGKILL the worker). The same with each platform's
real window: test_heroku.py (30 s) and tests/k8s/test_pods.py (grace period).
"""
from __future__ import annotations

import json
import time

from app.uvicorn_worker import drain_seconds
from tests.platforms.infra import new_secret_key, sh
from tests.platforms.stuck import open_stuck_request, still_open

GRACEFUL = 8  # short, so the test is quick; the platforms' values are checked in test_shutdown_windows.py


def wait_exited(name: str, timeout: float) -> tuple[float, int]:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        state = json.loads(sh("docker", "inspect", "-f", "{{json .State}}", name).stdout)
        if state["Status"] == "exited":
            return time.monotonic() - start, state["ExitCode"]
        time.sleep(0.1)
    raise AssertionError(f"{name} still running after {timeout}s")


def test_a_stuck_request_is_cancelled_inside_the_graceful_timeout(lab, app_image, timings):
    env = {"SECRET_KEY": new_secret_key(), "ALLOWED_HOSTS": "chat.example.test",
           # Nothing connects to them before a request needs them.
           "DATABASE_URL": "postgres://chat:x@db.invalid:5432/chat", "REDIS_URL": "redis://kv.invalid:6379/0",
           "GUNICORN_GRACEFUL_TIMEOUT": str(GRACEFUL), "WEB_CONCURRENCY": "1"}
    name = lab.run("stuck", app_image, env=env, read_only=True, tmpfs=["/tmp"], publish=[8000])
    port = lab.port(name, 8000)
    lab.wait_tcp(name, port)
    sock = open_stuck_request("127.0.0.1", port)
    try:
        assert still_open(sock), "the stuck request was answered: it is not stuck"
        start = time.monotonic()
        sh("docker", "kill", "-s", "TERM", name)  # what every platform sends first
        took, code = wait_exited(name, GRACEFUL + 20)
    finally:
        sock.close()
    logs = lab.logs(name)
    timings["stuck request drained"] = took
    assert "timeout graceful shutdown exceeded" in logs, logs[-3000:]
    assert "SIGKILL" not in logs and "WORKER TIMEOUT" not in logs, logs[-3000:]
    assert code == 0, f"exit {code}:\n{logs[-3000:]}"
    assert drain_seconds(GRACEFUL) - 0.5 <= took < GRACEFUL, f"exited after {took:.1f}s (drain {drain_seconds(GRACEFUL)}s, graceful {GRACEFUL}s)"
    lab.remove(name)
