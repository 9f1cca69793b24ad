"""The chat's Prometheus metrics and the hooks that count them.

One instance runs several gunicorn workers, each its own process; a scrape
reaches one of them. With PROMETHEUS_MULTIPROC_DIR set (gunicorn.conf.py does
when metrics are on), prometheus_client keeps every process's values in
memory-mapped files there and the scrape sums them (`render`): counters of a
worker that died stay in the totals, the live gauges of a dead worker are
dropped by gunicorn's `child_exit` hook (app/observability/multiproc.py).
Without it (runserver, unit tests) the values live in this process.

What is counted (README "Observability"):

- chat_websocket_connections: open chat sockets (live sum over the workers);
- chat_websocket_handshakes_total{outcome}: every websocket handshake, by how
  it ended (accepted, unauthenticated, no_room, bad_path, bad_host,
  bad_origin, rate_limited, too_many_sockets, unavailable);
- chat_messages_stored_total; chat_messages_rejected_total{reason} (the
  error frame's code: binary, too_long, bad_json, missing_message, empty,
  bad_text, rate_limited, or not_saved when storing failed);
- chat_deliveries_total: message frames written to sockets (live fan-out,
  replays on reconnect, resync catch-up); chat_delivery_seconds: from the
  moment a worker took a message to store it to the moment each live copy
  was written to a socket (the fan-out latency users feel);
- chat_resync_runs_total, chat_resync_frames_total (app/chat/resync.py);
- chat_rate_limited_total{limit}: refusals by a limit (frame: a socket's own
  rate; user-message: a user's messages over all sockets; sockets: a user's
  open sockets; handshake, login, signup: per address; room: rooms created
  per user; account: django-axes' lockout);
- process_*: per worker (pid label) memory, file descriptors and start
  time; process_cpu_seconds_total summed over the instance's workers.

Cost: a delivery happens thousands of times a second, and one prometheus_client
update in multiprocess mode takes a lock and writes a memory-mapped file
(about 1 us; 3 updates per delivery with the histogram). So `delivered()` and
`latency()` only add to plain Python numbers of this process (about 0.3 us
together), and `flush()` writes them to the shared files once a second (the
ticker `ensure_ticker` starts on the worker's event loop) and when the worker
exits. A worker killed with SIGKILL loses at most that last second of
delivery counts. Everything else is rare and counted at once.
"""
from __future__ import annotations

import asyncio
import bisect
import math
import os
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.process_collector import ProcessCollector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
FLUSH_SECONDS = 1.0
PROCESS_SECONDS = 5.0

HANDSHAKE_OUTCOMES = ("accepted", "unauthenticated", "no_room", "bad_path", "bad_host", "bad_origin",
                      "rate_limited", "too_many_sockets", "unavailable", "client_gone")
REJECT_REASONS = ("binary", "too_long", "bad_json", "missing_message", "empty", "bad_text", "rate_limited",
                  "not_saved")
# The limit names of app/chat/throttle.py's buckets, plus the socket's own
# frame bucket, the per-user socket slots and django-axes' account lockout.
LIMITS = ("frame", "user-message", "sockets", "handshake", "login", "signup", "room", "account")
# Label values outside the lists above (a code added later) are counted as
# themselves, up to this many per metric; then as "other": never unbounded.
MAX_EXTRA_LABELS = 20
# Store-to-send seconds: a healthy fan-out is a few ms to tens of ms; the
# benchmark's knee is where p99 reaches 250 ms.
DELIVERY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# Our metrics only (never the library's global default registry). With the
# multiprocess directory the scrape reads the files instead (render()).
REGISTRY = CollectorRegistry(auto_describe=True)

CONNECTIONS = Gauge("chat_websocket_connections", "Open chat websockets (live sum over the instance's workers).",
                    multiprocess_mode="livesum", registry=REGISTRY)
HANDSHAKES = Counter("chat_websocket_handshakes", "Websocket handshakes by outcome.", ["outcome"], registry=REGISTRY)
STORED = Counter("chat_messages_stored", "Chat messages stored.", registry=REGISTRY)
REJECTED = Counter("chat_messages_rejected", "Frames refused with an error frame, by its code.", ["reason"],
                   registry=REGISTRY)
DELIVERIES = Counter("chat_deliveries", "Message frames written to sockets (live, replay and resync).",
                     registry=REGISTRY)
DELIVERY_SECONDS = Histogram("chat_delivery_seconds",
                             "Seconds from taking a message to store it to writing each live copy to a socket.",
                             buckets=DELIVERY_BUCKETS, registry=REGISTRY)
RESYNC_RUNS = Counter("chat_resync_runs", "Completed resync passes (app/chat/resync.py).", registry=REGISTRY)
RESYNC_FRAMES = Counter("chat_resync_frames", "Message frames sent by resync passes.", registry=REGISTRY)
RATE_LIMITED = Counter("chat_rate_limited", "Requests, handshakes and frames refused by a limit.", ["limit"],
                       registry=REGISTRY)

# Process metrics, sampled from /proc every PROCESS_SECONDS by each worker
# (prometheus_client's ProcessCollector reports only the process that answers
# the scrape, which in multiprocess mode is any one worker).
PROCESS_CPU = Counter("process_cpu_seconds",
                      "User and system CPU seconds of the instance's workers (ended workers included).",
                      registry=REGISTRY)
PROCESS_GAUGES = {
    name: Gauge(name, text, multiprocess_mode="liveall", registry=REGISTRY)
    for name, text in (
        ("process_resident_memory_bytes", "Resident memory of each worker (pid label), bytes."),
        ("process_virtual_memory_bytes", "Virtual memory of each worker (pid label), bytes."),
        ("process_open_fds", "Open file descriptors of each worker (pid label); one per socket."),
        ("process_max_fds", "File descriptor limit of each worker (pid label)."),
        ("process_start_time_seconds", "Start time of each worker (pid label), seconds since the epoch."),
    )
}


def _children(metric, known):
    return {value: metric.labels(value) for value in known}


_handshakes = _children(HANDSHAKES, HANDSHAKE_OUTCOMES)
_rejected = _children(REJECTED, REJECT_REASONS)
_limited = _children(RATE_LIMITED, LIMITS)


def _child(cache: dict, metric, value: str):
    child = cache.get(value)
    if child is None:
        if len(cache) >= _LABEL_CAP[id(metric)]:
            value = "other"
        child = cache.get(value) or cache.setdefault(value, metric.labels(value))
    return child


_LABEL_CAP = {id(metric): len(known) + MAX_EXTRA_LABELS
              for metric, known in ((HANDSHAKES, HANDSHAKE_OUTCOMES), (REJECTED, REJECT_REASONS), (RATE_LIMITED, LIMITS))}


# --- hooks (one line each where the chat decides) ------------------------------------------

def handshake(outcome: str) -> None:
    _child(_handshakes, HANDSHAKES, outcome).inc()


def socket_opened() -> None:
    CONNECTIONS.inc()


def socket_closed() -> None:
    CONNECTIONS.dec()


def stored(count: int = 1) -> None:
    STORED.inc(count)


def rejected(reason: str) -> None:
    _child(_rejected, REJECTED, reason).inc()


def rate_limited(limit: str) -> None:
    _child(_limited, RATE_LIMITED, limit).inc()


def resync_run(frames: int) -> None:
    RESYNC_RUNS.inc()
    if frames:
        RESYNC_FRAMES.inc(frames)


# The per-frame ones: plain numbers of this process, written by flush().
_pending = {"deliveries": 0, "sum": 0.0}
_latency_counts = [0] * (len(DELIVERY_BUCKETS) + 1)  # the last one: +Inf


def delivered() -> None:
    """A message frame was written to a socket (event loop thread only)."""
    _pending["deliveries"] += 1


def latency(at: float | None) -> None:
    """A live copy of a message taken at `at` (time.time()) was just written."""
    if at is None:
        return
    seconds = time.time() - at
    if seconds < 0:  # another host's clock
        seconds = 0.0
    _pending["sum"] += seconds
    _latency_counts[bisect.bisect_left(DELIVERY_BUCKETS, seconds)] += 1


def _add_to_histogram(histogram: Histogram, counts: list[int], total: float) -> None:
    """Add `counts[i]` observations to bucket i and `total` to the sum.

    prometheus_client has no public call for "n observations in bucket i";
    `observe()` adds 1 to the first bucket whose bound is >= the value and the
    value to `_sum`. This adapter does the same to the same value objects
    (`_buckets`, `_sum`) in bulk; tests/unit/test_observability.py pins it
    against observe() so a library change that breaks it fails a test."""
    for i, n in enumerate(counts):
        if n:
            histogram._buckets[i].inc(n)
    histogram._sum.inc(total)


assert list(DELIVERY_SECONDS._upper_bounds) == [*DELIVERY_BUCKETS, math.inf], "histogram adapter out of step"


def flush() -> None:
    """Write this process's pending per-frame counts to the shared values."""
    count = _pending["deliveries"]
    if count:
        _pending["deliveries"] = 0
        DELIVERIES.inc(count)
    if any(_latency_counts):
        counts, total = list(_latency_counts), _pending["sum"]
        _latency_counts[:] = [0] * len(_latency_counts)
        _pending["sum"] = 0.0
        _add_to_histogram(DELIVERY_SECONDS, counts, total)


_process = {"collector": None, "cpu": 0.0, "at": 0.0}


def sample_process() -> None:
    """This worker's /proc figures into the process_* metrics."""
    if _process["collector"] is None:
        _process["collector"] = ProcessCollector(registry=None)
    for family in _process["collector"].collect():
        for sample in family.samples:
            if sample.name == "process_cpu_seconds_total":
                delta = sample.value - _process["cpu"]
                if delta > 0:
                    PROCESS_CPU.inc(delta)
                    _process["cpu"] = sample.value
            elif sample.name in PROCESS_GAUGES:
                PROCESS_GAUGES[sample.name].set(sample.value)
    _process["at"] = time.monotonic()


_ticker = {"loop": None}


def ensure_ticker() -> None:
    """Start the once-a-second flush on the running event loop (once per loop)."""
    loop = asyncio.get_running_loop()
    if _ticker["loop"] is loop:
        return
    _ticker["loop"] = loop
    loop.call_soon(_tick, loop)


def _tick(loop) -> None:
    if _ticker["loop"] is not loop:
        return  # a newer loop took over (tests); this one stops
    try:
        flush()
        if time.monotonic() - _process["at"] >= PROCESS_SECONDS:
            sample_process()
    finally:
        loop.call_later(FLUSH_SECONDS, _tick, loop)


# --- the scrape -------------------------------------------------------------------------

def multiprocess_dir() -> str | None:
    path = os.environ.get(MULTIPROC_ENV)
    return path if path and os.path.isdir(path) else None


def render(accept: str | None = None) -> tuple[bytes, str]:
    """The exposition (Prometheus text, or OpenMetrics when asked) and its content type.
    Reads every worker's files: call it off the event loop (asyncio.to_thread)."""
    encoder, content_type = choose_encoder(accept or "")
    path = multiprocess_dir()
    if path:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=path)
    else:
        registry = REGISTRY
    return encoder(registry), content_type
