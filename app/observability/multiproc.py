"""The multiprocess directory's life, driven by gunicorn.conf.py's hooks.

prometheus_client's multiprocess mode keeps each process's values in files
named by pid in PROMETHEUS_MULTIPROC_DIR; a scrape sums them. Its rules, and
how the hooks follow them:

- the directory must be empty when the instance starts, or the values of a
  previous run are added to this one's: `prepare()` in `on_starting` (once per
  master; a HUP reload keeps the directory, so counters keep counting);
- the live gauges of a worker that ended must be removed, or its open sockets
  are counted for ever: `worker_died()` in `child_exit` (also after a SIGKILL:
  the master reaps the worker and calls the hook). Its counters stay, so the
  totals never go down;
- the variable must be set before prometheus_client is imported in the
  workers: gunicorn.conf.py sets it when it is read, in the master.

Where: $PROMETHEUS_MULTIPROC_DIR if set, else `chat-metrics-<master pid>` in
gunicorn's worker_tmp_dir (/tmp: the one writable place on a read-only root).
The master's pid makes two instances on one host use two directories and
stays the same through a HUP reload.
"""
from __future__ import annotations

import glob
import os
import shutil
import sys

ENV = "PROMETHEUS_MULTIPROC_DIR"
PREFIX = "chat-metrics-"


def directory(tmp_dir: str, environ=os.environ) -> tuple[str, bool]:
    """(path, owned): the directory to use, and whether it is ours to remove
    at exit (the default one, named after this master; also when a HUP reload
    reads gunicorn.conf.py again and finds it in the environment)."""
    own = os.path.join(tmp_dir, f"{PREFIX}{os.getpid()}")
    chosen = (environ.get(ENV) or "").strip()
    if chosen:
        return chosen, os.path.abspath(chosen) == os.path.abspath(own)
    return own, True


def prepare(path: str) -> None:
    """Create the directory (owner only) and remove any values left in it."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    if not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(f"{ENV}={path} is not writable by this user")
    for stale in glob.glob(os.path.join(path, "*.db")):
        os.remove(stale)


def worker_died(pid: int, path: str) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, path)


def flush_worker() -> None:
    """gunicorn's worker_exit: write the delivery counts this worker has not
    written yet, if it ever counted any (importing the metrics just to flush
    would create empty files for the pid)."""
    module = sys.modules.get("app.observability.metrics")
    if module is not None:
        module.flush()


def cleanup(path: str, owned: bool) -> None:
    if owned:
        shutil.rmtree(path, ignore_errors=True)
