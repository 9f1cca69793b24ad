"""Health-check runners that act on results the way each platform documents.

A `Checker` calls one check against one instance at the check's interval and
keeps the platform's state for that instance: in rotation or not, restarted
or not. What each platform does with results (its docs, read with the
search tool; README "Health checks"):

- Fly.io service checks (`[[http_service.checks]]`): "a failing health check
  can prevent request routing to your Machine. However your Machines won't
  automatically restart or stop due to failing their health checks". Fly
  Proxy routes no new connection to a machine whose check is failing (with
  none healthy, "the connection will block waiting for the bad instance to
  become healthy"). Top-level `[checks]` "do not affect request routing";
  `fly deploy` waits for all of them to pass.
- Render (`healthCheckPath`): GET every few seconds, 2xx/3xx within 5 s is
  healthy; an instance failing "for 15 consecutive seconds" loses its
  traffic, "after 60 consecutive seconds" Render restarts the service. A new
  instance takes traffic only once it passes (a deploy that never passes is
  cancelled after 15 minutes). The interval is not published: 5 s here.
- Kubernetes: tests/k8s/kubelet.py's `Watch` (readiness -> endpoints,
  liveness -> container restart).
"""
from __future__ import annotations

import http.client
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

RENDER_INTERVAL = 5.0
RENDER_UNROUTE_AFTER = 15.0
RENDER_RESTART_AFTER = 60.0


@dataclass
class Result:
    ok: bool
    detail: str


def http_probe(get: Callable[[], "object"], healthy: Callable[[int], bool]) -> Callable[[], Result]:
    """Adapt an `infra.http_get`-style call (returns .status/.body) into a probe."""
    def probe() -> Result:
        try:
            r = get()
            return Result(healthy(r.status), f"HTTP {r.status} {r.body[:120]!r}")
        except (OSError, http.client.HTTPException) as exc:
            return Result(False, f"{type(exc).__name__}: {exc}")
    return probe


@dataclass(eq=False)  # threads must stay hashable
class Checker(threading.Thread):
    """One check on one instance, with the platform's reaction to it."""

    label: str                       # e.g. "fly machine1 http_service.checks[0] /startupz"
    probe: Callable[[], Result]
    interval: float
    grace: float = 0.0
    routing: bool = True             # does this check decide routing?
    unroute_after: float = 0.0       # seconds of consecutive failures before routing stops (0: first failure)
    restart_after: float | None = None
    on_restart: Callable[[], None] | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    # state and history
    in_rotation: bool = True
    restarts: int = 0
    results: list = field(default_factory=list)   # (t, ok, detail)
    events: list = field(default_factory=list)    # (t, what)

    def __post_init__(self):
        threading.Thread.__init__(self, name=self.label, daemon=True)

    def _event(self, now: float, what: str):
        self.events.append((now, what))

    def run(self):
        if self.stop.wait(self.grace):
            return
        failing_since = None
        while not self.stop.is_set():
            tick = time.monotonic()
            result = self.probe()
            now = time.monotonic()
            self.results.append((now, result.ok, result.detail))
            if result.ok:
                failing_since = None
                if self.routing and not self.in_rotation:
                    self.in_rotation = True
                    self._event(now, "back in rotation")
            else:
                failing_since = failing_since if failing_since is not None else now
                failed_for = now - failing_since
                if self.routing and self.in_rotation and failed_for >= self.unroute_after:
                    self.in_rotation = False
                    self._event(now, f"out of rotation ({result.detail})")
                if self.restart_after is not None and failed_for >= self.restart_after:
                    self.restarts += 1
                    self._event(now, "restart")
                    if self.on_restart:
                        self.on_restart()
                    failing_since = None
            self.stop.wait(max(0.0, self.interval - (time.monotonic() - tick)))

    # --- summaries ------------------------------------------------------------------
    def failures(self) -> int:
        return sum(1 for _, ok, _ in self.results if not ok)

    def first_out(self) -> float | None:
        return next((t for t, what in self.events if what.startswith("out of rotation")), None)


def run_together(checkers: list[Checker]):
    for c in checkers:
        c.start()


def stop_all(checkers: list[Checker]):
    for c in checkers:
        c.stop.set()
    for c in checkers:
        c.join(30)


def nobody_routable(checkers: list[Checker], instances: list[str]) -> bool:
    """Whether the routing checks ever had every instance out of rotation at once."""
    routing = [c for c in checkers if c.routing]
    moments = sorted(t for c in routing for t, _ in c.events)
    for moment in moments:
        out = set()
        for c in routing:
            state = True
            for t, what in c.events:
                if t <= moment:
                    state = not what.startswith("out of rotation") if what != "restart" else state
            if not state:
                out.add(next(i for i in instances if i in c.label))
        if out >= set(instances):
            return True
    return False


def describe(checkers: list[Checker], t0: float) -> str:
    lines = []
    for c in checkers:
        evs = ", ".join(f"+{t - t0:.1f}s {what}" for t, what in c.events) or "no action"
        lines.append(f"{c.label}: {c.failures()}/{len(c.results)} failed; {evs}")
    return "\n".join(lines)


OUTAGE_SECONDS = 30.0


def redis_outage(pause: Callable[[], None], resume: Callable[[], None], seconds: float = OUTAGE_SECONDS) -> tuple[float, float]:
    """An emulated Redis outage: the container frozen (`docker pause`: its
    sockets stay open but nothing answers, as in a network partition or a
    hung primary), then thawed. Returns (start, end) in monotonic time."""
    start = time.monotonic()
    pause()
    try:
        time.sleep(seconds)
    finally:
        resume()
    return start, time.monotonic()


def wait_all_passing(checkers: list[Checker], timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(c.results and c.results[-1][1] for c in checkers):
            return
        time.sleep(0.5)
    raise AssertionError("checks not all passing before the outage:\n" + describe(checkers, deadline - timeout))
