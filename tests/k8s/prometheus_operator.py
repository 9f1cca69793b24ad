"""prometheus-operator objects (the metrics component's ServiceMonitor)
against the published schema validators of the npm package
@kubernetes-models/prometheus-operator (tests/k8s/prometheus-operator-validate/,
provenance in its PROVENANCE.md).

Installed like the Gateway API validators (tests/k8s/gateway_api.py's
`install`: `npm ci --ignore-scripts` of the committed lock, every tarball
checked against its SHA-512 `integrity`, reused while the lock is unchanged)
into .cache/prometheus-operator-validate.
"""
from __future__ import annotations

import functools
import json
import subprocess
from pathlib import Path

from tests.k8s import gateway_api, kube

GROUP = "monitoring.coreos.com"
PROJECT = Path(__file__).with_name("prometheus-operator-validate")
CACHE = kube.REPO / ".cache" / "prometheus-operator-validate"


def is_prometheus_operator(obj: dict) -> bool:
    return obj.get("apiVersion", "").partition("/")[0] == GROUP


@functools.cache
def modules() -> Path:
    return gateway_api.install(PROJECT, CACHE)


def validate(objects: list[dict], node_modules: Path | None = None) -> list[dict]:
    """One result per object, in order: {kind, name, model, errors, unknownFields}."""
    result = subprocess.run(
        ["node", str(PROJECT / "validate.mjs"), str(node_modules or modules())],
        input=json.dumps(objects), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode in (0, 1), f"validate.mjs failed ({result.returncode}):\n{result.stderr}"
    results = json.loads(result.stdout)
    sent = [(o.get("kind"), o.get("metadata", {}).get("name")) for o in objects]
    assert [(r["kind"], r["name"]) for r in results] == sent, (results, sent)
    assert (result.returncode == 0) == all(not r["errors"] and not r["unknownFields"] for r in results), result
    return results


def problems(objects: list[dict]) -> list[str]:
    out = []
    for r in validate(objects):
        where = f"{r['kind']}/{r['name']}"
        out += [f"{where}: {e}" for e in r["errors"]]
        out += [f"{where}: {path}: unknown field" for path in r["unknownFields"]]
    return out
