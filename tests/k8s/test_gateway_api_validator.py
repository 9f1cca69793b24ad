"""tests/k8s/gateway-api-validate is installed only from its committed lock:
exact versions, every tarball checked against the lock's SHA-512 by `npm ci`."""
from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest

from tests.k8s import gateway_api

PACKAGE = "@kubernetes-models/gateway-api"


def lock() -> dict:
    return json.loads((gateway_api.PROJECT / "package-lock.json").read_text())


def test_the_lock_pins_every_package_by_version_and_sha512():
    manifest = json.loads((gateway_api.PROJECT / "package.json").read_text())
    assert manifest["dependencies"] == {PACKAGE: "2.0.0"}, "pin an exact version, not a range"
    packages = {k: v for k, v in lock()["packages"].items() if k}
    assert packages[f"node_modules/{PACKAGE}"]["version"] == "2.0.0"
    for name, entry in packages.items():
        assert re.fullmatch(r"sha512-[A-Za-z0-9+/]{86}==", entry.get("integrity", "")), f"{name}: no SHA-512 integrity"
        assert not entry.get("hasInstallScript"), f"{name} runs an install script"
    provenance = (gateway_api.PROJECT / "PROVENANCE.md").read_text()
    assert packages[f"node_modules/{PACKAGE}"]["integrity"] in provenance


def test_the_validator_in_use_is_the_locked_one():
    modules = gateway_api.modules()
    installed = json.loads((modules / PACKAGE / "package.json").read_text())
    assert installed["version"] == "2.0.0"
    assert (modules.parent / "installed.sha256").read_text().strip() == gateway_api.lock_digest()


def copy_of_project(dest: Path) -> Path:
    shutil.copytree(gateway_api.PROJECT, dest, ignore=shutil.ignore_patterns("node_modules"))
    return dest


@pytest.mark.parametrize("target", [PACKAGE, "ajv"])
def test_a_wrong_integrity_fails_the_install_and_installs_nothing(tmp_path, target):
    """The package itself and a transitive dependency: a tarball that is not
    the locked one is refused (npm's EINTEGRITY), nothing is left to use."""
    project = copy_of_project(tmp_path / "project")
    data = lock()
    wrong = "sha512-" + base64.b64encode(hashlib.sha512(b"not the tarball").digest()).decode()
    data["packages"][f"node_modules/{target}"]["integrity"] = wrong
    (project / "package-lock.json").write_text(json.dumps(data, indent=2))
    with pytest.raises(AssertionError) as failed:
        gateway_api.install(project, tmp_path / "cache")
    assert "EINTEGRITY" in str(failed.value) and wrong in str(failed.value), failed.value
    assert not (tmp_path / "cache" / "installed.sha256").exists()
    assert not (tmp_path / "cache" / "node_modules" / PACKAGE).exists()
