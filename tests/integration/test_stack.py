"""The production stack for real: gunicorn (2 Uvicorn workers), Redis, PostgreSQL."""
import json
import re
import secrets
import subprocess
import time
import urllib.request
from contextlib import ExitStack

import pytest

from tests.harness import chat_client as cc
from tests.harness import prod_venv
from tests.harness.services import REPO, Gunicorn, RedisServer, free_port
from tests.harness.sockets import server_pid
from tests.harness.stack import app_env


def get(port, path, host="127.0.0.1", headers=None):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Host": host, **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def test_clients_on_different_workers_receive_each_others_messages(stack):
    ep = cc.endpoint(stack.url)
    user = cc.new_user(ep)
    room = cc.create_room(user)
    workers = stack.gunicorn.worker_pids()
    assert len(workers) == 2
    with ExitStack() as stack_of_sockets:
        by_worker = {}
        for _ in range(40):  # the kernel picks the worker; keep connecting until both are used
            ws = stack_of_sockets.enter_context(ep.websocket(f"/ws/rooms/{room}/", user.cookies))
            pid = server_pid(stack.port, ws.socket.getsockname()[1], workers)
            if pid is not None:  # not found in the kernel's table this time: the next socket is read again
                by_worker.setdefault(pid, ws)
            if len(by_worker) == 2:
                break
        assert set(by_worker) == set(workers), f"could not reach both workers: {list(by_worker)}"
        first, second = by_worker.values()
        text = f"across workers {secrets.token_hex(4)}"
        cc.send(first, text)
        cc.wait_for_text(second, text)
        cc.wait_for_text(first, text)


def test_reconnect_replays_missed_messages_once(stack):
    ep = cc.endpoint(stack.url)
    alice, bob = cc.new_user(ep), cc.new_user(ep)
    room = cc.create_room(alice)
    path = f"/ws/rooms/{room}/"
    shown = cc.Shown()  # what alice's page shows; it reconnects with ?after=<shown.after>
    with ep.websocket(path, alice.cookies) as a:
        cc.send(a, "before the blip")
        frame, _ = cc.wait_for_text(a, "before the blip")
    shown.apply(frame)
    missed = [f"missed {n} {secrets.token_hex(3)}" for n in range(5)]
    with ep.websocket(path, bob.cookies) as b:
        for text in missed:
            cc.send(b, text)
            cc.wait_for_text(b, text)
    with ep.websocket(f"{path}?after={shown.after}", alice.cookies) as a:
        frames = [a.recv(timeout=5) for _ in missed]
        assert [t in f for t, f in zip(missed, frames)] == [True] * len(missed)
        with pytest.raises(TimeoutError):
            a.recv(timeout=0.5)  # nothing twice


def test_static_files_are_served_with_far_future_cache_headers(stack):
    manifest = json.loads((stack.gunicorn.cwd / "staticfiles" / "staticfiles.json").read_text())  # the staged release
    hashed = manifest["paths"]["chat/vendor/htmx-2.0.11.min.js"]
    assert hashed != "chat/vendor/htmx-2.0.11.min.js"
    status, headers, body = get(stack.port, f"/static/{hashed}", headers={"X-Forwarded-Proto": "https"})
    assert status == 200 and b"htmx" in body[:500]
    max_age = int(re.search(r"max-age=(\d+)", headers["cache-control"]).group(1))
    assert max_age >= 365 * 24 * 3600 and "immutable" in headers["cache-control"]
    status, headers, _ = get(stack.port, f"/static/{hashed}", headers={"X-Forwarded-Proto": "https", "Accept-Encoding": "gzip"})
    assert headers.get("content-encoding") == "gzip"


def test_404_shows_no_debug_page(stack):
    status, _, body = get(stack.port, "/nope/", headers={"X-Forwarded-Proto": "https"})
    assert status == 404 and b"URLconf" not in body and b"Traceback" not in body


def test_production_runs_from_the_production_lock_without_daphne(stack):
    python = prod_venv.ensure() / "python"
    with open(f"/proc/{stack.gunicorn.proc.pid}/cmdline", "rb") as fh:
        argv = fh.read().split(b"\0")
    assert str(prod_venv.ensure() / "gunicorn").encode() in argv, argv  # the stack runs from the production venv
    result = subprocess.run([str(python), "-c", "import daphne"], capture_output=True, text=True)
    assert "No module named 'daphne'" in result.stderr
    assert "daphne" not in stack.gunicorn.log().lower()


@pytest.fixture
def own_redis_stack(postgres):
    """A gunicorn with its own Redis, so stopping Redis disturbs nobody else."""
    redis = RedisServer().start()
    env = app_env(redis, postgres)
    gunicorn = Gunicorn(env).start()
    yield redis, gunicorn
    gunicorn.stop()
    redis.stop()


def test_readyz_turns_503_when_redis_stops_and_recovers(own_redis_stack, stack):
    redis, gunicorn = own_redis_stack
    assert get(gunicorn.port, "/readyz")[0] == 200
    redis.stop()
    deadline = time.monotonic() + 5  # /readyz's result may be up to 1 s old (app/health.py)
    while (answer := get(gunicorn.port, "/readyz"))[0] == 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    status, _, body = answer
    assert status == 503
    checks = json.loads(body)["checks"]
    assert checks["database"] == "ok" and checks["channel_layer"] != "ok"
    assert get(gunicorn.port, "/healthz")[0] == 200  # liveness does not depend on Redis
    redis.restart()
    deadline = time.monotonic() + 20
    while get(gunicorn.port, "/readyz")[0] != 200:
        assert time.monotonic() < deadline, "readiness did not recover after Redis came back"
        time.sleep(0.2)


def _tls_redis(tmp_path):
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=redis-test",
         "-keyout", tmp_path / "key.pem", "-out", tmp_path / "cert.pem"], check=True, capture_output=True)
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--tls-cert-file", tmp_path / "cert.pem", "--tls-key-file", tmp_path / "key.pem", "--tls-auth-clients", "no",
         "--requirepass", "tls-test-pw"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    from tests.harness.services import wait_for_port

    wait_for_port(port, proc=proc, what="redis-server (TLS)")
    return proc, port


def test_rediss_with_a_self_signed_certificate_needs_the_opt_in(tmp_path, postgres, stack):
    proc, port = _tls_redis(tmp_path)
    try:
        url = f"rediss://:tls-test-pw@127.0.0.1:{port}/0"
        for insecure, expected in (("True", 200), ("False", 503)):
            env = app_env(RedisServer(), postgres, REDIS_TLS_INSECURE=insecure)
            env["REDIS_URL"] = url
            gunicorn = Gunicorn(env)
            gunicorn.proc = None
            try:
                if expected == 200:
                    gunicorn.start()
                    assert get(gunicorn.port, "/readyz")[0] == 200
                else:
                    gunicorn.start(until="/healthz")  # it runs, but is never ready:
                    status, _, body = get(gunicorn.port, "/readyz")
                    assert status == 503 and b"channel_layer" in body
            finally:
                gunicorn.stop()
    finally:
        proc.terminate()
        proc.wait()
