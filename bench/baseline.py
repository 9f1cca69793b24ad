"""The "before" checkout: a git ref checked out into a temporary worktree for one run.

`python -m bench --baseline REF` measures REF and this checkout with the same generator, the
same services and the same seeded data, phase by phase (before, then after), so every figure
gets a before and an after column from one run on one machine. The worktree is removed when
the run ends, whatever happens.

The production venv (tests/harness/prod_venv.py) is built from *this* checkout's lock, so a
baseline is measured with the current dependencies: only its app code and gunicorn.conf.py differ.
"""
from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

# Issue #13's "before": main's HEAD when the performance work started (recorded, not computed,
# so the comparison stays with the code the issue measured even after main moves on).
ISSUE_BEFORE = "705e027eb566f8b4a4a8e922aec2add9779a63d0"


def _git(repo: Path, *args: str) -> str:
    result = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=120)
    if result.returncode:
        raise RuntimeError(f"git {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout.strip()


class Baseline:
    """`with Baseline(repo, ref) as path:` a detached worktree of ref, removed afterwards."""

    def __init__(self, repo: Path, ref: str):
        self.repo, self.ref = Path(repo), ref
        self.commit = _git(self.repo, "rev-parse", "--verify", f"{ref}^{{commit}}")
        self.path: Path | None = None

    def __enter__(self) -> Path:
        self.path = Path(tempfile.mkdtemp(prefix="bench-baseline-")) / "checkout"
        _git(self.repo, "worktree", "add", "--detach", str(self.path), self.commit)
        return self.path

    def __exit__(self, *exc):
        if self.path is not None:
            try:
                _git(self.repo, "worktree", "remove", "--force", str(self.path))
            finally:
                subprocess.run(["git", "-C", str(self.repo), "worktree", "prune"], capture_output=True, timeout=60)
                try:
                    self.path.parent.rmdir()
                except OSError:
                    pass
        return False
