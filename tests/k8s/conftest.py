"""Fixtures for the Kubernetes target: the real kubectl, the rendered base and
demo kustomizations. Pod tests (test_pods.py) need Docker and are marked so."""
from __future__ import annotations

import time

import pytest

from tests.k8s import kube

TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="session")
def k8s_timings():
    yield TIMINGS
    if TIMINGS:
        print("\nk8s timings: " + ", ".join(f"{k}={v:.1f}s" for k, v in TIMINGS.items()))


@pytest.fixture(scope="session")
def kubectl() -> str:
    return kube.kubectl()


@pytest.fixture(scope="session")
def rendered(kubectl, k8s_timings) -> list[dict]:
    start = time.monotonic()
    objects = kube.render(kube.K8S)
    k8s_timings["render"] = time.monotonic() - start
    return objects


@pytest.fixture(scope="session")
def rendered_demo(kubectl) -> list[dict]:
    return kube.render(kube.K8S / "postgres-demo")


@pytest.fixture(scope="session")
def rendered_ingress_nginx(kubectl, tmp_path_factory) -> list[dict]:
    """deploy/k8s with the optional ingress-nginx component, enabled the way
    kustomization.yaml's comment says (uncommenting its `components:` lines)."""
    copy = kube.copy_of_base(tmp_path_factory.mktemp("k8s") / "k8s")
    text = (copy / "kustomization.yaml").read_text()
    commented = "# components:\n#   - components/ingress-nginx\n"
    assert commented in text, "kustomization.yaml no longer shows how to enable the ingress-nginx component"
    (copy / "kustomization.yaml").write_text(text.replace(commented, "components:\n  - components/ingress-nginx\n"))
    return kube.render(copy)


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/k8s/test_pods" in str(item.fspath):
            item.add_marker(pytest.mark.docker)
