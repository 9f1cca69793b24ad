"""Metrics and JSON logs in-process (app/observability/); the real stack with
2 gunicorn workers is tests/faults/test_metrics.py.

- the /metrics endpoint: the bearer token on the app port, a 404 exactly like
  an unknown path for anything else, any Host; METRICS_PORT without a token;
- the per-frame batching and the histogram adapter, pinned against
  prometheus_client's own observe();
- multiprocess aggregation and dead-worker cleanup with real forked
  processes writing real multiprocess files (a subprocess: prometheus_client
  picks its mode at import);
- the JSON log formatter.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import subprocess
import sys
import time

import pytest
from django.test import override_settings
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.parser import text_string_to_metric_families

from app.observability import endpoint, logs, metrics
from tests.harness.services import REPO

TOKEN = "t0k3n-" + "AbCdEfGhIjKlMnOpQrStUvWxYz0123456789"
METRICS_PORT = 9091


def samples(body: bytes) -> dict[tuple, float]:
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def call(app, path, headers=(), method="GET", port=8000, host=b"chat.example.com"):
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", host), *headers], "client": ("127.0.0.1", 5555), "server": ("10.1.2.3", port)}
    sent, requests = [], [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive():
        if requests:
            return requests.pop()
        await asyncio.Event().wait()  # the client stays connected

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], sorted(start["headers"]), body


@pytest.fixture
def app():
    from app.asgi import django_asgi_app

    with override_settings(METRICS_TOKEN=TOKEN, METRICS_PORT=METRICS_PORT):
        yield endpoint.Observability(django_asgi_app)


def bearer(value: str):
    return [(b"authorization", value.encode())]


# --- the endpoint -----------------------------------------------------------------------

@pytest.mark.django_db
async def test_the_token_gets_metrics_whatever_the_host(app):
    for host in (b"chat.example.com", b"10.1.2.3:8000", b"evil.example"):
        status, headers, body = await call(app, "/metrics", bearer(f"Bearer {TOKEN}"), host=host)
        assert status == 200, (host, body[:200])
        assert dict(headers)[b"content-type"].startswith(b"text/plain")
        assert ("chat_websocket_connections", ()) in samples(body)
    status, _, _ = await call(app, "/metrics", bearer(f"bearer {TOKEN}"))  # the scheme is case-insensitive
    assert status == 200
    status, _, body = await call(app, "/metrics", bearer(f"Bearer {TOKEN}"), method="HEAD")
    assert status == 200 and body == b""


@pytest.mark.django_db
@pytest.mark.parametrize("headers, method", [
    ((), "GET"),
    (bearer("Bearer wrong-token"), "GET"),
    (bearer(f"Bearer {TOKEN}x"), "GET"),
    (bearer(f"Bearer {TOKEN[:-1]}"), "GET"),
    (bearer(f"Basic {TOKEN}"), "GET"),
    (bearer(TOKEN), "GET"),
    (bearer(f"Bearer {TOKEN}"), "POST"),
], ids=["none", "wrong", "longer", "shorter", "basic", "no-scheme", "post"])
async def test_anything_else_is_exactly_an_unknown_path(app, headers, method):
    got = await call(app, "/metrics", headers, method=method)
    unknown = await call(app, "/no-such-page", headers, method=method)
    assert got[0] == 404 or (method == "POST" and got[0] == unknown[0]), got[:2]
    assert got == unknown
    # ...and with a Host outside ALLOWED_HOSTS, the same 400 as any page.
    assert (await call(app, "/metrics", headers, method=method, host=b"evil.example"))[0] == 400


@pytest.mark.django_db
async def test_without_a_token_setting_the_app_port_serves_no_metrics():
    from app.asgi import django_asgi_app

    with override_settings(METRICS_TOKEN=None, METRICS_PORT=0):
        plain = endpoint.Observability(django_asgi_app)
    for header in ((), bearer("Bearer "), bearer("Bearer None")):
        assert (await call(plain, "/metrics", header))[0] == 404


@pytest.mark.django_db
async def test_the_metrics_port_needs_no_token_and_serves_nothing_else(app):
    status, _, body = await call(app, "/metrics", port=METRICS_PORT, host=b"[fdaa::3]:9091")
    assert status == 200 and ("chat_deliveries_total", ()) in samples(body)
    for path in ("/", "/healthz", "/accounts/login/", "/metrics/"):
        status, _, body = await call(app, path, port=METRICS_PORT)
        assert (status, body) == (404, endpoint.NOT_FOUND), path
    status, _, _ = await call(app, "/metrics", method="POST", port=METRICS_PORT)
    assert status == 404
    # A websocket there is refused before accept (HTTP 403).
    sent = []

    async def receive():
        return {"type": "websocket.connect"}

    async def send(message):
        sent.append(message)

    await app({"type": "websocket", "path": "/ws/rooms/1/", "headers": [], "server": ("10.1.2.3", METRICS_PORT)},
              receive, send)
    assert sent == [{"type": "websocket.close", "code": 1008}]


def test_bearer_comparison_is_constant_time_and_exact():
    scope = {"headers": [(b"authorization", f"Bearer {TOKEN}".encode())]}
    assert endpoint.bearer_matches(scope, TOKEN.encode())
    assert not endpoint.bearer_matches(scope, None)
    assert not endpoint.bearer_matches({"headers": []}, TOKEN.encode())
    import inspect

    assert "compare_digest" in inspect.getsource(endpoint.bearer_matches)


# --- counting ---------------------------------------------------------------------------

def test_deliveries_wait_in_the_process_until_flushed():
    metrics.flush()
    before = metrics.DELIVERIES._value.get()
    for _ in range(5):
        metrics.delivered()
    assert metrics.DELIVERIES._value.get() == before, "a delivery wrote to the shared value at once"
    metrics.flush()
    assert metrics.DELIVERIES._value.get() == before + 5
    metrics.flush()
    assert metrics.DELIVERIES._value.get() == before + 5


def histogram_samples(h) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in h.collect() for s in family.samples if not s.name.endswith("_created")}


def test_the_histogram_adapter_matches_observe():
    """The adapter writes prometheus_client's private `_buckets`/`_sum`: pinned
    here against the library's own observe() for the same values (bounds included)."""
    values = [0.0, 0.0005, 0.001, 0.0010001, 0.004, 0.05, 0.2, 0.25, 3.0, 10.0, 11.0, 1e6]
    observed = Histogram("x_seconds", "x", buckets=metrics.DELIVERY_BUCKETS, registry=CollectorRegistry())
    for v in values:
        observed.observe(v)
    batched = Histogram("x_seconds", "x", buckets=metrics.DELIVERY_BUCKETS, registry=CollectorRegistry())
    counts = [0] * (len(metrics.DELIVERY_BUCKETS) + 1)
    import bisect

    for v in values:
        counts[bisect.bisect_left(metrics.DELIVERY_BUCKETS, v)] += 1
    metrics._add_to_histogram(batched, counts, sum(values))
    assert histogram_samples(batched) == histogram_samples(observed)


def test_latency_lands_in_the_bucket_observe_would_choose(monkeypatch):
    metrics.flush()
    before = histogram_samples(metrics.DELIVERY_SECONDS)
    now = 0.0  # exact differences: at the bounds the bucket is decided by <=
    monkeypatch.setattr(metrics.time, "time", lambda: now)
    for seconds in (0.01, 0.0100001, 2.0):
        metrics.latency(now - seconds)
    metrics.latency(now + 5)  # another host's clock ahead: counted as 0
    metrics.latency(None)  # an event without a time: not a live delivery
    metrics.flush()
    after = histogram_samples(metrics.DELIVERY_SECONDS)

    def delta(le):
        key = ("chat_delivery_seconds_bucket", (("le", le),))
        return after[key] - before[key]

    assert delta("0.001") == 1  # the clock-skewed one, as 0
    assert delta("0.01") == 2 and delta("0.025") == 3 and delta("2.5") == 4 and delta("+Inf") == 4
    total = after[("chat_delivery_seconds_sum", ())] - before[("chat_delivery_seconds_sum", ())]
    assert math.isclose(total, 0.01 + 0.0100001 + 2.0, rel_tol=1e-6)


def test_unknown_label_values_are_bounded():
    for n in range(metrics.MAX_EXTRA_LABELS + 10):
        metrics.rejected(f"made_up_{n}")
    assert len(metrics._rejected) <= len(metrics.REJECT_REASONS) + metrics.MAX_EXTRA_LABELS + 1
    assert "other" in metrics._rejected


def test_a_rejection_is_not_a_limit_by_itself():
    """Which limit refused is counted where it refused (the socket's bucket,
    throttle's buckets), so the per-user budget and the socket's rate, which
    share the error code, are told apart and never counted twice."""
    frame = metrics.RATE_LIMITED.labels("frame")._value.get()
    rejected = metrics.REJECTED.labels("rate_limited")._value.get()
    metrics.rejected("rate_limited")
    assert metrics.RATE_LIMITED.labels("frame")._value.get() == frame
    assert metrics.REJECTED.labels("rate_limited")._value.get() == rejected + 1


# --- multiprocess: real processes, real files --------------------------------------------

MULTIPROCESS = r"""
import json, os, sys, time
os.environ["PROMETHEUS_MULTIPROC_DIR"] = sys.argv[1]
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from app.observability import multiproc  # not the metrics: like gunicorn's master, this process counts nothing
multiproc.prepare(sys.argv[1])  # on_starting

def worker(sockets, deliveries, ready):
    from app.observability import metrics
    for _ in range(sockets):
        metrics.handshake("accepted")
        metrics.socket_opened()
    for _ in range(deliveries):
        metrics.delivered()
        metrics.latency(time.time() - 0.003)
    metrics.flush()
    metrics.sample_process()
    os.write(ready, b"x")  # counted and written: now wait to be killed
    time.sleep(60)

def spawn(sockets, deliveries):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            worker(sockets, deliveries, w)
        finally:
            os._exit(0)
    assert os.read(r, 1) == b"x"
    return pid

def scrape():  # what app.observability.metrics.render does with the directory
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=sys.argv[1])
    return generate_latest(registry).decode()

a, b = spawn(3, 5), spawn(2, 7)
both = scrape()
os.kill(b, 9)
os.waitpid(b, 0)
killed = scrape()  # killed, not yet reaped by a master's child_exit
multiproc.worker_died(b, sys.argv[1])
reaped = scrape()
os.kill(a, 9)
os.waitpid(a, 0)
print(json.dumps({"pids": [a, b], "both": both, "killed": killed, "reaped": reaped}))
"""


@pytest.fixture(scope="module")
def multiprocess_run(tmp_path_factory):
    directory = tmp_path_factory.mktemp("multiproc") / "chat-metrics-test"
    result = subprocess.run([sys.executable, "-c", MULTIPROCESS, str(directory)], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def parsed(text) -> dict:
    return samples(text.encode())


def test_multiprocess_values_are_summed_over_workers(multiprocess_run):
    both = parsed(multiprocess_run["both"])
    assert both[("chat_websocket_connections", ())] == 5
    assert both[("chat_websocket_handshakes_total", (("outcome", "accepted"),))] == 5
    assert both[("chat_deliveries_total", ())] == 12
    assert both[("chat_delivery_seconds_count", ())] == 12
    assert both[("chat_delivery_seconds_bucket", (("le", "0.005"),))] == 12
    pids = {str(p) for p in multiprocess_run["pids"]}
    rss = {dict(labels)["pid"] for (name, labels) in both if name == "process_resident_memory_bytes"}
    assert rss == pids, rss


def test_a_dead_workers_counters_stay_and_its_gauges_leave(multiprocess_run):
    killed, reaped = parsed(multiprocess_run["killed"]), parsed(multiprocess_run["reaped"])
    # Until the master reaps it the files say 5; child_exit's worker_died drops its 2 sockets.
    assert killed[("chat_websocket_connections", ())] == 5
    assert reaped[("chat_websocket_connections", ())] == 3
    assert reaped[("chat_websocket_handshakes_total", (("outcome", "accepted"),))] == 5
    assert reaped[("chat_deliveries_total", ())] == 12
    assert reaped[("chat_delivery_seconds_count", ())] == 12
    dead = str(multiprocess_run["pids"][1])
    assert not [k for k in reaped if dict(k[1]).get("pid") == dead], "the dead worker's process gauges are still there"
    assert [k for k in reaped if dict(k[1]).get("pid") == str(multiprocess_run["pids"][0])]


def test_prepare_removes_a_previous_runs_values(tmp_path):
    from app.observability import multiproc

    directory = tmp_path / "chat-metrics-1"
    directory.mkdir()
    (directory / "counter_123.db").write_bytes(b"old")
    (directory / "keep.txt").write_text("not ours")
    multiproc.prepare(str(directory))
    assert sorted(p.name for p in directory.iterdir()) == ["keep.txt"]


def test_the_directory_is_per_master_and_stable_through_a_reload(tmp_path):
    import os

    from app.observability import multiproc

    path, owned = multiproc.directory(str(tmp_path), environ={})
    assert owned and path == os.path.join(str(tmp_path), f"chat-metrics-{os.getpid()}")
    # A HUP reload reads gunicorn.conf.py again, with the variable it set the first time.
    assert multiproc.directory(str(tmp_path), environ={multiproc.ENV: path}) == (path, True)
    assert multiproc.directory(str(tmp_path), environ={multiproc.ENV: "/srv/metrics"}) == ("/srv/metrics", False)


# --- JSON logs -----------------------------------------------------------------------------

def record(name="app.chat", msg="hello %s", args=("world",), level=logging.INFO, exc_info=None, **extra):
    r = logging.LogRecord(name, level, __file__, 1, msg, args, exc_info)
    for k, v in extra.items():
        setattr(r, k, v)
    return r


def test_a_json_line_has_the_fields_and_nothing_else():
    fmt = logs.JsonFormatter()
    tokens = logs.bind({"type": "http", "headers": [(b"x-request-id", b"req-1234567890")]})
    logs.set_user(42)
    try:
        line = fmt.format(record(password="hunter2-secret", headers={"Cookie": "sessionid=abc"}))
    finally:
        logs.unbind(tokens)
        logs.user_id.set(None)
    assert "\n" not in line
    entry = json.loads(line)
    assert set(entry) == {"ts", "level", "logger", "message", "pid", "request_id", "user_id"}, entry
    assert entry["message"] == "hello world" and entry["level"] == "INFO" and entry["logger"] == "app.chat"
    assert entry["request_id"] == "req-1234567890" and entry["user_id"] == 42
    assert entry["ts"].endswith("Z") and entry["pid"] > 0
    assert "hunter2" not in line and "sessionid" not in line


def test_request_ids_are_made_when_missing_or_odd_and_websockets_get_a_connection_id():
    for header in ([], [(b"x-request-id", b"a b\nc")], [(b"x-request-id", b"short")]):
        tokens = logs.bind({"type": "http", "headers": header})
        try:
            assert len(logs.request_id.get()) == 16
        finally:
            logs.unbind(tokens)
    tokens = logs.bind({"type": "websocket", "headers": []})
    try:
        assert logs.connection_id.get() and logs.request_id.get() is None
    finally:
        logs.unbind(tokens)
    assert logs.connection_id.get() is None


def test_access_lines_and_tracebacks_become_fields():
    fmt = logs.JsonFormatter()
    entry = json.loads(fmt.format(record("uvicorn.access", '%s - "%s %s HTTP/%s" %d',
                                         ("127.0.0.1:5000", "GET", "/rooms/?page=2", "1.1", 404))))
    assert (entry["client"], entry["method"], entry["path"], entry["status"]) == ("127.0.0.1:5000", "GET",
                                                                                  "/rooms/?page=2", 404)
    entry = json.loads(fmt.format(record("uvicorn.error", '%s - "WebSocket %s" %d', ("127.0.0.1:5", "/ws/x/", 429))))
    assert entry["method"] == "WEBSOCKET" and entry["status"] == 429
    try:
        raise ValueError("boom")
    except ValueError:
        entry = json.loads(fmt.format(record(level=logging.ERROR, exc_info=sys.exc_info())))
    assert entry["exc"].startswith("Traceback") and "ValueError: boom" in entry["exc"]


def test_ids_do_not_leak_between_tasks():
    async def one(n):
        tokens = logs.bind({"type": "http", "headers": [(b"x-request-id", f"request-{n:04d}".encode())]})
        try:
            await asyncio.sleep(0.01)
            return logs.request_id.get()
        finally:
            logs.unbind(tokens)

    async def main():
        return await asyncio.gather(*(one(n) for n in range(20)))

    assert asyncio.run(main()) == [f"request-{n:04d}" for n in range(20)]


def test_the_gunicorn_config_is_json_only_when_asked():
    assert logs.gunicorn_logconfig("plain", "info") is None
    config = logs.gunicorn_logconfig("json", "debug")
    assert config["loggers"]["gunicorn.error"]["level"] == "DEBUG"
    assert config["formatters"]["json"]["()"] == "app.observability.logs.JsonFormatter"
