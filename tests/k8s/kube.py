"""Rendering and reading the Kubernetes manifests in deploy/k8s.

`kubectl()` is a real kubectl 1.35 (built-in kustomize 5.7) fetched once by
tests/k8s/fetch_kubectl.sh into .cache/kubectl/ (never one found on PATH, so
every machine renders with the same version). `render()` runs
`kubectl kustomize`; `overlay()` writes a throw-away kustomization on top of
deploy/k8s (how a user sets the image) and renders that.
"""
from __future__ import annotations

import functools
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
FETCH = Path(__file__).with_name("fetch_kubectl.sh")
CACHE = REPO / ".cache" / "k8s-test"


@functools.cache
def kubectl() -> str:
    result = subprocess.run(["bash", str(FETCH)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"fetch_kubectl.sh failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout.strip().splitlines()[-1]


def render(directory: Path | str = K8S) -> list[dict]:
    result = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"kubectl kustomize {directory} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def relative_to_overlay(path: Path) -> str:
    """`path` as seen from an overlay directory made by overlay()."""
    return str(Path("..") / ".." / ".." / path.relative_to(REPO))


def overlay(kustomization: dict, base: Path = K8S) -> list[dict]:
    """Render `kustomization` (with `resources: [deploy/k8s]` added) from a temporary directory."""
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="overlay-", dir=CACHE))
    try:
        body = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                "resources": [relative_to_overlay(base)], **kustomization}
        (tmp / "kustomization.yaml").write_text(yaml.safe_dump(body))
        return render(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def copy_of_base(dest: Path) -> Path:
    """A copy of deploy/k8s (to render it with an edited file)."""
    shutil.copytree(K8S, dest)
    return dest


def find(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}"
    return found[0]


def all_of(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def pod_template(obj: dict) -> dict:
    """The pod template of a workload (Deployment, StatefulSet, Job, DaemonSet, CronJob)."""
    spec = obj["spec"]
    if obj["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return spec["template"]


WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob", "ReplicaSet")


def workloads(objects: list[dict]) -> list[dict]:
    return [o for o in objects if o["kind"] in WORKLOAD_KINDS]


def config_data(objects: list[dict], name_prefix: str = "chat-config") -> dict:
    cms = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith(name_prefix)]
    assert len(cms) == 1, cms
    return cms[0]["data"]


# --- label selectors -----------------------------------------------------------

def selector_matches(selector: dict | None, labels: dict) -> bool:
    """metav1.LabelSelector semantics: {} matches everything, None nothing."""
    if selector is None:
        return False
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def service_selects(service: dict, labels: dict) -> bool:
    selector = service["spec"].get("selector")
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# --- quantities -------------------------------------------------------------------

_BIN = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
_DEC = {"k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def memory_bytes(quantity: str | int) -> int:
    text = str(quantity)
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]i|[kMGT])?", text)
    assert match, f"unsupported memory quantity {text!r}"
    number, unit = float(match.group(1)), match.group(2)
    return int(number * (_BIN.get(unit) or _DEC.get(unit) or 1))


def cpu_cores(quantity: str | int | float) -> float:
    text = str(quantity)
    if text.endswith("m"):
        return int(text[:-1]) / 1000
    return float(text)
