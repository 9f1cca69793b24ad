"""Local Debian base images for tests: no registry is reachable here.

debootstrap builds a root file system from the Debian mirror this machine
already uses, the host's CA bundle is copied in (so pip inside a container
trusts the same certificates as the host), and `docker import` turns it into
an image. Images are cached by tag: a second call is free.
"""
from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import re
import shutil
import subprocess
import tempfile

PYTHON_PACKAGES = ["python3", "python3-venv", "python-is-python3", "ca-certificates"]
SYSTEMD_PACKAGES = [
    "systemd", "systemd-sysv", "openssh-server", "python3", "sudo",
    "ca-certificates", "iproute2", "procps",
]


def debian_mirror() -> str:
    """The first `URIs:` entry of the host's deb822 sources (never hard-coded)."""
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        with open(path) as fh:
            for line in fh:
                if line.startswith("URIs:"):
                    return line.split()[1]
    raise RuntimeError("no URIs: line in /etc/apt/sources.list.d/*.sources")


def image_exists(tag: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", tag], capture_output=True).returncode == 0


def lock_path(tag: str) -> str:
    return os.path.join(tempfile.gettempdir(), "chat-test-image-" + re.sub(r"[^\w.-]", "_", tag) + ".lock")


@contextlib.contextmanager
def building(tag: str):
    """One build of `tag` at a time on this machine: `make test`'s two lanes
    (tests/conftest.py) and parallel sessions may ask for the same image at
    once; the second waits, then finds it built."""
    with open(lock_path(tag), "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        yield


def build_debian_image(tag: str, suite: str = "trixie", include: list[str] | None = None,
                       changes: list[str] | None = None) -> str:
    """Build (once) a minbase Debian image called `tag` and return the tag."""
    if image_exists(tag):
        return tag
    with building(tag):
        if not image_exists(tag):
            _debootstrap_image(tag, suite, include, changes)
    return tag


def _debootstrap_image(tag: str, suite: str, include: list[str] | None, changes: list[str] | None) -> None:
    root = tempfile.mkdtemp(prefix="debroot-")
    try:
        pkgs = ",".join(include or PYTHON_PACKAGES)
        subprocess.run(
            ["debootstrap", "--variant=minbase", f"--include={pkgs}", suite, root, debian_mirror()],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        # Trust what the host trusts (test fixtures only; the product's
        # Dockerfile does nothing special).
        shutil.copy("/etc/ssl/certs/ca-certificates.crt", os.path.join(root, "etc/ssl/certs/ca-certificates.crt"))
        subprocess.run(["rm", "-rf", os.path.join(root, "var/cache/apt/archives"), os.path.join(root, "var/lib/apt/lists")])
        os.makedirs(os.path.join(root, "var/lib/apt/lists/partial"), exist_ok=True)
        os.makedirs(os.path.join(root, "var/cache/apt/archives/partial"), exist_ok=True)
        cmd = ["docker", "import"]
        for change in changes or []:
            cmd += ["-c", change]
        tar = subprocess.Popen(["tar", "-C", root, "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(cmd + ["-", tag], stdin=tar.stdout, check=True, stdout=subprocess.DEVNULL)
        if tar.wait() != 0:
            raise RuntimeError("tar of the debootstrap root failed")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def python_base_image(tag: str = "chat-test/debian-python:trixie") -> str:
    """Debian 13 with Python 3.13: stands in for python:3.13-slim-trixie."""
    return build_debian_image(tag, "trixie", PYTHON_PACKAGES, ['CMD ["python3"]'])


def systemd_base_image(tag: str = "chat-test/debian-systemd:bookworm", suite: str = "bookworm") -> str:
    """A Debian host that boots systemd and sshd: stands in for a VM."""
    return build_debian_image(tag, suite, SYSTEMD_PACKAGES, ['CMD ["/sbin/init"]'])


if __name__ == "__main__":
    import sys
    which = sys.argv[1] if len(sys.argv) > 1 else "python"
    print(python_base_image() if which == "python" else systemd_base_image())


SERVICES_PACKAGES = ["redis-server", "postgresql", "openssl"]


def services_image(tag: str = "chat-test/services:trixie") -> str:
    """The local Python base plus Redis (built with TLS), PostgreSQL and openssl:
    stands in for the platforms' managed Postgres and Key-Value add-ons."""
    if image_exists(tag):
        return tag
    base = python_base_image()
    with building(tag):
        if not image_exists(tag):
            _build_services_image(tag, base)
    return tag


def _build_services_image(tag: str, base: str) -> None:
    dockerfile = (
        f"FROM {base}\n"
        "RUN apt-get update \\\n"
        f" && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends {' '.join(SERVICES_PACKAGES)} \\\n"
        " && rm -rf /var/lib/apt/lists/*\n"
    )
    env = dict(os.environ, DOCKER_BUILDKIT="0")
    subprocess.run(["docker", "build", "--network", "host", "-t", tag, "-"], input=dockerfile.encode(),
                   env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
