"""Every platform kills after the app's drain ends (tests/platforms/windows.py).

The chain on every target: the platform's stop signal -> gunicorn's master
stops accepting and tells its workers -> each Uvicorn worker closes
websockets (1012), waits for open requests at most `drain_seconds` and then
cancels what is stuck -> the master exits; it would SIGKILL a worker still
alive at `graceful_timeout`. The platform's own SIGKILL must come later still.
The dynamic half (a stuck connection against the real image and the Heroku
and Kubernetes emulations) is in test_shutdown.py, test_heroku.py and
tests/k8s/test_pods.py.
"""
from __future__ import annotations

import pytest

from tests.platforms import windows

# What a platform needs after gunicorn's graceful_timeout: the master reaps
# its workers and exits (measured well under 1 s); keep a few seconds.
MARGIN = 3


@pytest.mark.parametrize("platform", sorted(windows.ALL))
def test_the_platform_kills_after_the_drain(platform):
    w = windows.ALL[platform]()
    assert w.signal == "SIGTERM", f"{platform}: gunicorn drains on SIGTERM, the platform sends {w.signal}"
    assert w.uvicorn_drain < w.graceful, f"{platform}: Uvicorn's drain {w.uvicorn_drain}s must end inside gunicorn's {w.graceful}s"
    assert w.graceful + MARGIN <= w.kill_after, (
        f"{platform}: SIGKILL after {w.kill_after:.0f}s ({w.where}) races gunicorn's graceful_timeout "
        f"{w.graceful}s: set the window longer or GUNICORN_GRACEFUL_TIMEOUT shorter in that platform's environment")


def test_the_default_drain_fits_herokus_fixed_window():
    """Heroku cannot be configured: the app's default must fit 30 s."""
    assert windows.gunicorn_graceful_timeout({}) + MARGIN <= windows.HEROKU_KILL_AFTER


def test_the_windows_are_read_from_the_files(monkeypatch):
    """Positive/negative control of the reader: a GUNICORN_GRACEFUL_TIMEOUT in a
    platform's environment changes the drain, and 30 s would race Heroku."""
    assert windows.gunicorn_graceful_timeout({"GUNICORN_GRACEFUL_TIMEOUT": "7"}) == 7
    w = windows.heroku()
    w.env = {**w.env, "GUNICORN_GRACEFUL_TIMEOUT": "30"}
    assert not w.graceful + MARGIN <= w.kill_after
