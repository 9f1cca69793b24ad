"""deploy/ansible on one small VM: the same play with one host in every group.

Issue [C]: "the same play works when all groups are one host (a single small
VM)". One Debian 12 systemd+sshd container is in `web`, `db` and `redis` at
once; the real `ansible-playbook` deploys to it over SSH once, then the
deployment contract runs through testinfra's ansible backend on that host and
the black-box checker through its nginx (both users on the same host).
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import pytest

from tests.harness.contract import run_contract
from tests.vm.conftest import TIMINGS
from tests.vm.lab import DOMAIN, snapshot_source, single_host_lab

pytestmark = pytest.mark.docker

SERVICES = ("postgresql@15-main", "redis-server", "chat", "nginx")


@pytest.fixture(scope="module")
def single():
    for tool in ("docker", "ssh", "ssh-keygen", "git"):
        assert shutil.which(tool), f"{tool} is required for tests/vm (apt-get install docker.io openssh-client git)"
    workdir = Path(tempfile.mkdtemp(prefix="chat-vm1-"))
    lab = single_host_lab(workdir)
    try:
        start = time.monotonic()
        lab.start()
        TIMINGS["single host up"] = time.monotonic() - start
        yield lab, snapshot_source(workdir / "src")
    finally:
        lab.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def logs(lab) -> str:
    out = lab.hosts["vm"].sh(
        "journalctl -u chat --no-pager -n 40 2>&1; systemctl status chat nginx redis-server postgresql@15-main"
        " --no-pager 2>&1 | head -60", check=False)
    return f"--- vm ---\n{out.stdout}{out.stderr}"


@pytest.fixture(scope="module")
def deployed(single):
    lab, source = single
    run = lab.playbook(source)
    TIMINGS["single host deploy"] = run.seconds
    assert run.returncode == 0, f"ansible-playbook failed:\n{run.output[-8000:]}\n{logs(lab)}"
    assert set(run.recap) == {"vm"}, run.recap
    assert run.recap["vm"]["failed"] == 0 and run.recap["vm"]["unreachable"] == 0, run.recap
    assert run.recap["vm"]["changed"] > 0, run.recap
    return lab


def test_every_role_lands_on_the_one_host(deployed):
    vm = deployed.hosts["vm"]
    for unit in SERVICES:
        state = vm.sh(f"systemctl is-active {unit}; systemctl is-enabled {unit.split('@')[0]}", check=False).stdout.split()
        assert state == ["active", "enabled"], f"{unit}: {state}\n{logs(deployed)}"
    # The app reaches PostgreSQL and Redis on this host's own private address.
    env = vm.sh("cat /etc/chat/chat.env").stdout
    assert f"@{vm.address}:5432/" in env and f"@{vm.address}:6379/" in env, "DATABASE_URL/REDIS_URL do not point at this host"


def test_contract_on_the_single_host(deployed):
    """testinfra over SSH (ansible inventory) + the black-box checker through
    the host's nginx."""
    lab, vm = deployed, deployed.hosts["vm"]
    start = time.monotonic()
    try:
        run_contract(
            vm.https_url,
            f"ansible://vm?ansible_inventory={lab.inventory}",
            workers=2,
            port=8000,
            redis=f"{vm.address}:6379",
            host_header=DOMAIN,
            https_proxy=False,
            insecure=True,
            http_url=vm.http_url,
            env=lab.environment(),
        )
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{logs(lab)}") from None
    TIMINGS["contract single host"] = time.monotonic() - start
