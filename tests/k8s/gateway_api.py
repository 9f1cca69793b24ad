"""Gateway API objects against the published schema validators of the npm
package @kubernetes-models/gateway-api (tests/k8s/gateway-api-validate/,
provenance in its PROVENANCE.md).

`install()` runs `npm ci` on the committed package.json/package-lock.json in
a cache folder (.cache/gateway-api-validate): npm checks every tarball
against the lock's `integrity` (SHA-512) and installs nothing else. The
install is reused while the lock is unchanged. `validate()` pipes objects to
validate.mjs and returns one result per object: the schema's errors and the
fields its schema does not declare (what `kubectl apply`'s strict field
validation refuses). The CEL rules (x-kubernetes-validations) are not in
the package: test_manifests.py asserts what those rules say for these objects.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

from tests.k8s import kube

GROUPS = ("gateway.networking.k8s.io", "gateway.networking.x-k8s.io")
PROJECT = Path(__file__).with_name("gateway-api-validate")
CACHE = kube.REPO / ".cache" / "gateway-api-validate"
LOCK_FILES = ("package.json", "package-lock.json")


def is_gateway_api(obj: dict) -> bool:
    return obj.get("apiVersion", "").partition("/")[0] in GROUPS


def lock_digest(project: Path = PROJECT) -> str:
    return hashlib.sha256(b"".join((project / name).read_bytes() for name in LOCK_FILES)).hexdigest()


def install(project: Path = PROJECT, dest: Path = CACHE) -> Path:
    """node_modules of `project`'s lock, installed by `npm ci` into `dest`."""
    stamp = dest / "installed.sha256"
    modules = dest / "node_modules"
    digest = lock_digest(project)
    if modules.is_dir() and stamp.is_file() and stamp.read_text().strip() == digest:
        return modules
    for tool in ("node", "npm"):
        assert shutil.which(tool), f"{tool} is required (.ci/run installs it: apt-get install -y npm)"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for name in LOCK_FILES:
        shutil.copyfile(project / name, dest / name)
    result = subprocess.run(
        ["npm", "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=dest, capture_output=True, text=True, timeout=600,
        env={**os.environ, "npm_config_update_notifier": "false"},
    )
    if result.returncode != 0:
        shutil.rmtree(modules, ignore_errors=True)
        raise AssertionError(f"npm ci in {dest} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    stamp.write_text(digest + "\n")
    return modules


@functools.cache
def modules() -> Path:
    return install()


def validate(objects: list[dict], node_modules: Path | None = None) -> list[dict]:
    """One result per object, in order: {kind, name, model, errors, unknownFields}."""
    result = subprocess.run(
        ["node", str(PROJECT / "validate.mjs"), str(node_modules or modules())],
        input=json.dumps(objects), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode in (0, 1), f"validate.mjs failed ({result.returncode}):\n{result.stderr}"
    results = json.loads(result.stdout)
    sent = [(o.get("kind"), o.get("metadata", {}).get("name")) for o in objects]
    got = [(r["kind"], r["name"]) for r in results]
    assert got == sent, f"validate.mjs answered for {got}, was given {sent}"
    assert (result.returncode == 0) == all(not r["errors"] and not r["unknownFields"] for r in results), result
    return results


def problems(objects: list[dict]) -> list[str]:
    """Every schema error and undeclared field, as `Kind/name: /path: message`."""
    out = []
    for r in validate(objects):
        where = f"{r['kind']}/{r['name']}"
        out += [f"{where}: {e}" for e in r["errors"]]
        out += [f"{where}: {path}: unknown field" for path in r["unknownFields"]]
    return out
