"""Stage a release for the unprivileged production processes, as a deploy does.

When the tests run as root, gunicorn runs as `nobody` (never root, as on every
target), and `nobody` cannot enter a checkout below a private folder (`/root`,
any `mktemp -d` folder: mode 0700). So, like a real deploy that unpacks a
release into `/srv/...`, the harness copies what the server runs into a
folder everybody can read and runs it from there:

* the release: the files git tracks or would track (`git ls-files -co
  --exclude-standard`, i.e. the working tree as it is, uncommitted edits
  included, as `deploy/ansible` ships it) under RUNTIME, plus the build
  step's `collectstatic` output, in `<stage>/release-<content hash>/`;
* the production venv (tests/harness/prod_venv.py), in `<stage>/prod-venv-<hash>/`.

`<stage>` is `/var/cache/chat-tests` for root (root-owned, not writable by
anybody else, so nothing there can be planted by another user), the
checkout's `.cache/` otherwise (the processes then run as that same user), or
`CHAT_TEST_STAGE_DIR`. Identical content reuses one release; releases not
used for a day are removed.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# What the server imports and reads at run time; tests/ and deploy/ stay behind.
RUNTIME = ("manage.py", "gunicorn.conf.py", "app/")
KEEP_SECONDS = 24 * 3600


def stage_root() -> Path:
    chosen = os.environ.get("CHAT_TEST_STAGE_DIR")
    if chosen:
        root = Path(chosen)
    elif os.geteuid() == 0:
        root = Path("/var/cache/chat-tests")
    else:
        return REPO / ".cache"
    root.mkdir(mode=0o755, parents=True, exist_ok=True)
    info = root.stat()
    if os.geteuid() == 0 and (info.st_uid != 0 or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)):
        raise RuntimeError(f"{root} must be owned by root and writable by nobody else (it holds code run as nobody)")
    os.chmod(root, 0o755)  # readable by the unprivileged server whatever the umask
    return root


def runtime_files(repo: Path = REPO) -> list[str]:
    """Paths (relative to repo) of the files a release ships."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=repo, capture_output=True)
    if listed.returncode == 0:
        names = [n for n in listed.stdout.decode().split("\0") if n]
    else:  # not a git checkout (an unpacked archive): take the folders as they are
        names = [str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file()]
    keep = [n for n in names if n in RUNTIME or n.startswith(tuple(r for r in RUNTIME if r.endswith("/")))]
    return sorted(n for n in keep if (repo / n).is_file() and "__pycache__" not in n)


def _digest(repo: Path, names: list[str]) -> str:
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode() + b"\0")
        h.update((repo / name).read_bytes())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _build_static(release: Path, python: str) -> None:
    """The build step every target runs: collectstatic without secrets."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "PYTEST_"))}
    env["DJANGO_SETTINGS_MODULE"] = "app.settings_build"
    result = subprocess.run([python, "manage.py", "collectstatic", "--noinput", "-v0"], cwd=release, env=env,
                            capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"collectstatic failed in {release}:\n{result.stdout}\n{result.stderr}")


def _readable(top: Path) -> None:
    for path in [top, *top.rglob("*")]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)


def stage(repo: Path = REPO) -> Path:
    """Copy the release of `repo` to the stage (once per content) and return its folder."""
    from tests.harness import prod_venv

    root = stage_root()
    names = runtime_files(repo)
    if not names:
        raise RuntimeError(f"{repo} has none of {RUNTIME}: not a checkout of this project")
    release = root / f"release-{_digest(repo, names)}"
    if (release / ".staged").exists():
        os.utime(release / ".staged")
        return release
    python = str(prod_venv.ensure() / "python")
    with open(root / "stage.lock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)  # several test sessions may stage at once
        if not (release / ".staged").exists():
            building = Path(str(release) + f".tmp-{os.getpid()}")
            shutil.rmtree(building, ignore_errors=True)
            for name in names:
                target = building / name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(repo / name, target)
            _build_static(building, python)
            _readable(building)
            (building / ".staged").touch()
            shutil.rmtree(release, ignore_errors=True)
            os.rename(building, release)
        _prune(root, keep=release)
    return release


def _prune(root: Path, keep: Path) -> None:
    """Remove releases nobody staged for a day (a running session touches its own)."""
    now = time.time()
    for old in root.glob("release-*"):
        if old == keep:
            continue
        marker = old / ".staged"
        try:
            stale = now - (marker.stat().st_mtime if marker.exists() else old.stat().st_mtime) > KEEP_SECONDS
        except OSError:
            continue
        if stale:
            shutil.rmtree(old, ignore_errors=True)


if __name__ == "__main__":  # python -m tests.harness.release: stage and print the folder
    print(stage(Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else REPO))
