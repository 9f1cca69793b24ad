"""The harness itself: it works from any checkout folder and leaves nothing running.

* A checkout below a private folder (mode 0700, as `mktemp -d` and /root are)
  is staged where the unprivileged server can read it (tests/harness/release.py).
* A pytest session that errors half-way or is terminated stops every service
  the harness started (tests/harness/services.py, tests/conftest.py).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from tests.harness import release
from tests.harness.services import REPO

pytestmark = pytest.mark.integration


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in state


@pytest.mark.skipif(os.geteuid() != 0, reason="the server runs as the same user when the tests are not root")
def test_a_checkout_in_a_private_folder_is_staged_where_nobody_can_read_it():
    private = Path(tempfile.mkdtemp(prefix="chat-private-"))  # mode 0700, like mktemp -d
    try:
        checkout = private / "chat"
        for name in release.runtime_files():
            (checkout / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(REPO / name, checkout / name)
        as_nobody = ["runuser", "-u", "nobody", "--"]
        # The problem: nobody cannot even look at the checkout.
        assert subprocess.run(as_nobody + ["test", "-r", str(checkout / "manage.py")]).returncode != 0
        staged = release.stage(checkout)
        assert private not in staged.parents
        python = str(release.stage_root() / [p.name for p in release.stage_root().glob("prod-venv-*")][0] / "bin" / "python")
        result = subprocess.run(as_nobody + [python, "-c", "import app.settings_build, pathlib; "
                                             "print(pathlib.Path('staticfiles/staticfiles.json').is_file())"],
                                cwd=staged, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and result.stdout.strip() == "True", result.stderr
    finally:
        shutil.rmtree(private, ignore_errors=True)


CHILD_TEST = '''
import os, time
import pytest
from tests.harness.services import RedisServer

@pytest.fixture(scope="session")
def redis_then_error():
    server = RedisServer().start()
    open(os.environ["CHILD_PIDFILE"], "w").write(str(server.proc.pid))
    if os.environ["CHILD_MODE"] == "error":
        raise RuntimeError("a fixture failing half-way, after it started a service")
    yield server

def test_uses_it(redis_then_error):
    if os.environ["CHILD_MODE"] == "sigterm":
        open(os.environ["CHILD_PIDFILE"] + ".ready", "w").close()
        time.sleep(120)  # terminated meanwhile
'''


@pytest.mark.parametrize("mode", ["error", "sigterm"])
def test_a_session_that_errors_or_is_terminated_leaves_no_service_running(tmp_path, mode):
    (tmp_path / "test_child.py").write_text(textwrap.dedent(CHILD_TEST))
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    pidfile = tmp_path / "redis.pid"
    env = dict(os.environ, CHILD_MODE=mode, CHILD_PIDFILE=str(pidfile), PYTHONPATH=str(REPO))
    child = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
         "-c", str(tmp_path / "pytest.ini"), "--rootdir", str(tmp_path), str(tmp_path / "test_child.py")],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    if mode == "sigterm":
        deadline = time.monotonic() + 60
        while not Path(str(pidfile) + ".ready").exists():
            assert child.poll() is None and time.monotonic() < deadline, child.stdout.read()
            time.sleep(0.1)
        child.send_signal(signal.SIGTERM)  # what a CI timeout sends
    out, _ = child.communicate(timeout=90)
    assert pidfile.exists(), out
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    leaked = _alive(pid)
    if leaked:
        os.kill(pid, signal.SIGKILL)
    assert not leaked, f"redis-server {pid} outlived the {mode} session:\n{out}"
    assert child.returncode != 0, out  # the session did fail


def test_a_master_killed_with_sigkill_leaves_no_worker_behind(stack):
    """Uvicorn workers do not watch their parent: without stop()'s process-group
    kill they keep serving the port after the master dies (orphans found after
    a CI run). Positive control: the workers are alive after the master's death."""
    from tests.harness.services import Gunicorn, free_port

    env = {**stack.env, "PORT": str(free_port()), "WEB_CONCURRENCY": "2"}
    gunicorn = Gunicorn(env).start(ready_timeout=60)
    workers = gunicorn.worker_pids()
    assert len(workers) == 2, workers
    os.kill(gunicorn.proc.pid, signal.SIGKILL)
    gunicorn.proc.wait(10)
    time.sleep(0.5)
    assert all(_alive(pid) for pid in workers), "the workers died with their master: nothing to clean up"
    gunicorn.stop()
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in workers), f"workers outlived stop(): {workers}"
