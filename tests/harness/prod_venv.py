"""A virtualenv with the production lock only, for the production processes.

The bare stack's gunicorn and its release steps run from here, not from the
dev venv: no daphne, no test tools, exactly what the platforms install. When
the tests run as root, gunicorn runs as `nobody`, so this venv lives in the
stage (tests/harness/release.py: a folder `nobody` can read, wherever the
checkout is) and is built from an interpreter outside /root (Debian's
/usr/bin/python3); CHAT_PROD_PYTHON overrides the choice.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LOCK = REPO / "requirements.txt"


def interpreter() -> str:
    chosen = os.environ.get("CHAT_PROD_PYTHON")
    if chosen:
        return chosen
    if os.geteuid() == 0 and os.path.exists("/usr/bin/python3"):
        return "/usr/bin/python3"
    return getattr(sys, "_base_executable", sys.executable)


def venv_dir() -> Path:
    from tests.harness.release import stage_root

    python = interpreter()
    digest = hashlib.sha256(LOCK.read_bytes() + python.encode()).hexdigest()[:12]
    return stage_root() / f"prod-venv-{digest}"


def ensure() -> Path:
    """Build the venv once per lock and interpreter; return its bin/ folder."""
    target = venv_dir()
    stamp = target / ".installed"
    if stamp.exists():
        return target / "bin"
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / "prod-venv.lock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)  # several test sessions may ask at once
        if not stamp.exists():
            subprocess.run([interpreter(), "-m", "venv", "--clear", str(target)], check=True)
            subprocess.run(
                [str(target / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-deps", "--require-hashes",
                 "-r", str(LOCK)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )
            subprocess.run(["chmod", "-R", "a+rX", str(target)], check=True)  # whatever the umask
            stamp.touch()
    return target / "bin"
