"""Fixtures for the VM deployment tests (tests/vm): three systemd+sshd hosts."""
from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.vm.lab import Lab, snapshot_source

TIMINGS: dict[str, float] = {}


def pytest_collection_modifyitems(session, config, items):
    """The Sentinel layout test switches the shared three-host lab to Redis
    Sentinel with one more playbook run: it goes after every test of the
    default layout."""
    items.sort(key=lambda item: getattr(getattr(item, "module", None), "__name__", "").endswith("test_sentinel_layout"))


def timings_line() -> str:
    return "tests/vm timings: " + ", ".join(f"{k} {v:.0f}s" for k, v in TIMINGS.items())


def pytest_sessionfinish(session):
    """In an xdist lane, the line goes to the controller (tests/conftest.py prints it)."""
    output = getattr(session.config, "workeroutput", None)
    if output is not None and TIMINGS:
        output.setdefault("summary_lines", []).append(timings_line())


def pytest_terminal_summary(terminalreporter):
    if TIMINGS:
        terminalreporter.write_line(timings_line())


@pytest.fixture(scope="session")
def vm_workdir():
    path = Path(tempfile.mkdtemp(prefix="chat-vm-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def lab(vm_workdir):
    for tool in ("docker", "ssh", "ssh-keygen", "git"):
        assert shutil.which(tool), f"{tool} is required for tests/vm (apt-get install docker.io openssh-client git)"
    lab = Lab(vm_workdir, with_lb=True)
    start = time.monotonic()
    try:
        lab.start()
        TIMINGS["hosts up"] = time.monotonic() - start
        yield lab
    finally:
        lab.stop()


@pytest.fixture(scope="session")
def source(vm_workdir):
    """The release the tests deploy: a frozen copy of the working tree."""
    return snapshot_source(vm_workdir / "src")


def host_logs(lab: Lab, lines: int = 40) -> str:
    """What to show when a deploy or check fails."""
    parts = []
    for name in ("web1", "web2"):
        out = lab.hosts[name].sh(f"journalctl -u chat --no-pager -n {lines} 2>&1; systemctl status chat nginx --no-pager 2>&1 | head -30",
                                 check=False)
        parts.append(f"--- {name} ---\n{out.stdout}{out.stderr}")
    return "\n".join(parts)


def ssh(lab: Lab, host: str, command: str) -> subprocess.CompletedProcess:
    return subprocess.run(lab.ssh_command(lab.hosts[host], command), capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="session")
def deployed(lab, source):
    """The first deploy of the three-host lab (shared by every tests/vm module)."""
    run = lab.playbook(source)
    TIMINGS["first deploy"] = run.seconds
    assert run.returncode == 0, f"ansible-playbook failed:\n{run.output[-8000:]}\n{host_logs(lab)}"
    assert set(run.recap) == {"web1", "web2", "data"}, run.recap
    assert all(r["failed"] == 0 and r["unreachable"] == 0 for r in run.recap.values()), run.recap
    return run
