"""Three "VMs" for the ansible deployment: systemd+sshd containers.

Each host is a container built from a local debootstrap image that boots
systemd and sshd (tests/harness/debian_image.systemd_base_image), on a docker
network this lab creates; SSH (and nginx's 80/443 on the web hosts) are
published on 127.0.0.1 only. The SSH key is generated at run time and put in
root's authorized_keys, as a cloud provider's first boot would.
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness.debian_image import systemd_base_image
from tests.harness.services import REPO

ANSIBLE_DIR = REPO / "deploy" / "ansible"
# ansible-playbook, ansible-inventory (testinfra) and ansible-lint: beside this Python.
BIN = Path(sys.executable).parent
DOMAIN = "chat.vm.test"

# What a systemd container needs here (--privileged fails on this machine).
SYSTEMD_RUN_ARGS = [
    "--cap-add", "SYS_ADMIN", "--cap-add", "NET_ADMIN",
    # root on a VM may read any process's /proc/PID/fd and environ (the
    # contract does); in a container that takes CAP_SYS_PTRACE.
    "--cap-add", "SYS_PTRACE",
    "--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined",
    "-v", "/sys/fs/cgroup:/sys/fs/cgroup:rw", "--cgroupns=host",
    "--tmpfs", "/run", "--tmpfs", "/run/lock", "-e", "container=docker",
]


def docker(*args, check=True, timeout=120, **kw) -> subprocess.CompletedProcess:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, **kw)
    if check and result.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


@dataclass
class Host:
    name: str
    container: str
    groups: list[str]
    image: str
    ports: dict[int, int] = field(default_factory=dict)  # container port -> 127.0.0.1 port
    address: str = ""  # on the lab's private network

    def sh(self, script: str, check=True, timeout=60) -> subprocess.CompletedProcess:
        return docker("exec", self.container, "bash", "-c", script, check=check, timeout=timeout)

    @property
    def https_url(self) -> str:
        return f"https://127.0.0.1:{self.ports[443]}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.ports[80]}"


@dataclass
class LoadBalancer:
    """tests/vm/lb.py in a container: TLS on `port`, forwarding to web1:80."""
    container: str
    address: str = ""
    published: int = 0

    @property
    def https_url(self) -> str:
        return f"https://127.0.0.1:{self.published}"


class Lab:
    """web1 (Debian 12), web2 (Debian 13) and data (Debian 12: PostgreSQL + Redis),
    and, with `with_lb`, a TLS-terminating load balancer in front of web1."""

    LB_PORT = 8443

    def __init__(self, workdir: Path, with_lb: bool = False):
        self.with_lb = with_lb
        self.redis_primary = "data"
        self.lb: LoadBalancer | None = None
        self.prefix = f"cvm-{secrets.token_hex(3)}"
        self.network = f"{self.prefix}-net"
        self.workdir = workdir
        self.key = workdir / "id_ed25519"
        self.inventory = workdir / "inventory.yml"
        self.hosts = {
            "web1": Host("web1", f"{self.prefix}-web1", ["web"], "bookworm"),
            "web2": Host("web2", f"{self.prefix}-web2", ["web"], "trixie"),
            "data": Host("data", f"{self.prefix}-data", ["db", "redis"], "bookworm"),
        }
        # Secrets: generated now, handed to ansible through the environment.
        self.secrets = {
            "CHAT_SECRET_KEY": secrets.token_urlsafe(50),
            "CHAT_DB_PASSWORD": secrets.token_urlsafe(24),
            "CHAT_REDIS_PASSWORD": secrets.token_urlsafe(24),
            # Metrics on: each web host's nginx serves /metrics on its private address (tests/vm/test_metrics_exposure.py).
            "CHAT_METRICS_TOKEN": secrets.token_urlsafe(32),
        }

    # --- lifecycle -----------------------------------------------------------
    def start(self):
        images = {
            "bookworm": systemd_base_image(),
            "trixie": systemd_base_image("chat-test/debian-systemd:trixie", "trixie"),
        }
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", self.prefix, "-f", str(self.key)], check=True)
        pubkey = self.key.with_suffix(".pub").read_text().strip()
        docker("network", "create", self.network)
        for host in self.hosts.values():
            publish = [22] + ([80, 443] if "web" in host.groups else [])
            args = ["run", "-d", "--name", host.container, "--hostname", host.name, "--network", self.network,
                    "--network-alias", host.name, *SYSTEMD_RUN_ARGS]
            for port in publish:
                args += ["-p", f"127.0.0.1::{port}"]
            docker(*args, images[host.image], "/sbin/init")
            for port in publish:
                out = docker("port", host.container, f"{port}/tcp").stdout
                host.ports[port] = int(re.search(r"127\.0\.0\.1:(\d+)", out).group(1))
            host.address = docker(
                "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", host.container
            ).stdout.strip()
        if self.with_lb:
            self._start_lb()
        for host in self.hosts.values():
            self._wait_booted(host)
            host.sh(
                "install -d -m 0700 /root/.ssh && printf '%s\\n' \"$KEY\" > /root/.ssh/authorized_keys"
                " && chmod 0600 /root/.ssh/authorized_keys".replace("$KEY", pubkey)
            )
        for host in self.hosts.values():
            self._wait_ssh(host)
        self.write_inventory()

    def _start_lb(self):
        """The load balancer's address must be known before the first deploy
        (it goes into the inventory as nginx_trusted_proxies)."""
        from tests.harness.debian_image import python_base_image

        self.lb = LoadBalancer(f"{self.prefix}-lb")
        cert, key = self.workdir / "lb.crt", self.workdir / "lb.key"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={DOMAIN}",
                        "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
        docker("create", "--name", self.lb.container, "--network", self.network, "--network-alias", "lb",
               "-p", f"127.0.0.1::{self.LB_PORT}", python_base_image(),
               "python3", "/lb/lb.py", str(self.LB_PORT), "web1", "80", "/lb/lb.crt", "/lb/lb.key")
        staging = self.workdir / "lb"
        staging.mkdir(exist_ok=True)
        shutil.copy2(Path(__file__).with_name("lb.py"), staging / "lb.py")
        shutil.copy2(cert, staging / "lb.crt")
        shutil.copy2(key, staging / "lb.key")
        docker("cp", f"{staging}/.", f"{self.lb.container}:/lb")
        docker("start", self.lb.container)
        out = docker("port", self.lb.container, f"{self.LB_PORT}/tcp").stdout
        self.lb.published = int(re.search(r"127\.0\.0\.1:(\d+)", out).group(1))
        self.lb.address = docker("inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
                                 self.lb.container).stdout.strip()

    def _wait_booted(self, host: Host, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = host.sh("systemctl is-system-running || true", check=False).stdout.strip()
            if state in ("running", "degraded"):
                return
            time.sleep(0.5)
        raise AssertionError(f"{host.name} did not boot: {state}\n{host.sh('systemctl --failed --no-pager', check=False).stdout}")

    def _wait_ssh(self, host: Host, timeout=30):
        deadline = time.monotonic() + timeout
        while True:
            out = subprocess.run(self.ssh_command(host, "true"), capture_output=True, text=True, timeout=20)
            if out.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"ssh to {host.name} failed: {out.stderr}")
            time.sleep(0.5)

    def ssh_command(self, host: Host, command: str) -> list[str]:
        return ["ssh", *self.ssh_options, "-p", str(host.ports[22]), "root@127.0.0.1", command]

    @property
    def ssh_options(self) -> list[str]:
        return ["-i", str(self.key), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "LogLevel=ERROR", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]

    def write_inventory(self):
        import yaml

        groups = {}
        for group in ("web", "db", "redis", "redis_sentinel"):
            # The first `redis` host is the primary (the Sentinel layout's first deploy).
            members = sorted((h for h in self.hosts.values() if group in h.groups),
                             key=lambda h: group == "redis" and h.name != self.redis_primary)
            if members or group != "redis_sentinel":  # no redis_sentinel group: the single-Redis layout
                groups[group] = {"hosts": {h.name: {"ansible_host": "127.0.0.1", "ansible_port": h.ports[22]}
                                           for h in members}}
        inventory = {"all": {
            "vars": {
                "ansible_user": "root",
                "ansible_ssh_private_key_file": str(self.key),
                "ansible_ssh_common_args": " ".join(self.ssh_options[2:]),  # all but the key
                "ansible_python_interpreter": "/usr/bin/python3",
                # The "VMs" are containers: Debian's redis unit sets
                # PrivateUsers, which needs user namespaces a container lacks.
                "redis_service_overrides": {"PrivateUsers": "false"},
                # The lab's TLS-terminating load balancer in front of web1 (tests/vm/lb.py).
                **({"nginx_trusted_proxies": [self.lb.address]} if self.lb else {}),
            },
            "children": groups,
        }}
        self.inventory.write_text(yaml.safe_dump(inventory, sort_keys=False))

    def stop(self):
        if self.lb:
            docker("rm", "-f", "-v", self.lb.container, check=False)
        for host in self.hosts.values():
            docker("rm", "-f", "-v", host.container, check=False)
        docker("network", "rm", self.network, check=False)

    # --- ansible ------------------------------------------------------------
    def environment(self) -> dict:
        env = dict(os.environ)
        env.update(self.secrets)
        env.update({
            "CHAT_DOMAIN": DOMAIN,
            "PATH": f"{BIN}:{env.get('PATH', '')}",
            "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"),
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_FORCE_COLOR": "0",
            "ANSIBLE_LOCAL_TEMP": str(self.workdir / "ansible-tmp"),
            "ANSIBLE_HOME": str(self.workdir / "ansible-home"),
        })
        return env

    def playbook(self, source: Path, *extra: str, timeout=480) -> "PlaybookRun":
        cmd = [
            str(BIN / "ansible-playbook"), "-i", str(self.inventory), str(ANSIBLE_DIR / "site.yml"),
            "-e", f"app_source_dir={source}", "-e", f"app_build_dir={self.workdir / 'build'}", *extra,
        ]
        start = time.monotonic()
        result = subprocess.run(cmd, cwd=ANSIBLE_DIR, env=self.environment(), capture_output=True, text=True, timeout=timeout)
        run = PlaybookRun(result.returncode, result.stdout + result.stderr, time.monotonic() - start)
        (self.workdir / f"playbook-{int(time.time())}.log").write_text(run.output)
        return run


@dataclass
class PlaybookRun:
    returncode: int
    output: str
    seconds: float

    @property
    def recap(self) -> dict[str, dict[str, int]]:
        recap = {}
        tail = self.output.split("PLAY RECAP", 1)[-1]
        for match in re.finditer(r"^(\S+)\s+:\s+((?:\w+=\d+\s*)+)$", tail, re.M):
            recap[match.group(1)] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", match.group(2))}
        return recap

    def changed_tasks(self) -> list[str]:
        """`changed: [host]` lines with the task they belong to."""
        task, out = None, []
        for line in self.output.splitlines():
            if line.startswith(("TASK [", "RUNNING HANDLER [")):
                task = line.rstrip("* ")
            elif line.startswith("changed:"):
                out.append(f"{task} {line}")
        return out


def snapshot_source(dest: Path) -> Path:
    """A copy of the repository's working tree (tracked and untracked files git
    does not ignore) in a fresh git repository: the release the test deploys
    stays fixed while people keep editing the checkout."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.decode().split("\0")
    for name in filter(None, files):
        src = REPO / name
        if not src.is_file():
            continue  # deleted but still tracked
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
    subprocess.run(["git", "init", "-q", str(dest)], check=True)
    return dest




def single_host_lab(workdir: Path) -> Lab:
    """One small VM: a single Debian 12 systemd+sshd host in all three groups
    (web, db, redis), from the same cached image as the three-host lab."""
    lab = Lab(workdir)
    lab.prefix = f"cvm1-{secrets.token_hex(3)}"
    lab.network = f"{lab.prefix}-net"
    lab.hosts = {"vm": Host("vm", f"{lab.prefix}-vm", ["web", "db", "redis"], "bookworm")}
    return lab
