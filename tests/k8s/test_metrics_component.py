"""deploy/k8s/components/metrics: Prometheus (prometheus-operator) scrapes the
web pods' /metrics with the bearer token from the Secret.

Rendered by the real kubectl with the component enabled the way
kustomization.yaml's comment says; the ServiceMonitor validated by the
published @kubernetes-models/prometheus-operator validators (schema and
undeclared fields; tests/k8s/prometheus-operator-validate/PROVENANCE.md),
everything else by kubernetes-validate; the token comes from the Secret on
both ends, the NetworkPolicies admit Prometheus to the app port and nothing
else, and no secret is rendered. What the pods answer is tested on the real
stack (tests/faults/test_metrics.py) and on the pods (test_pods.py runs the
same image and settings).
"""
from __future__ import annotations

import copy

import kubernetes_validate
import pytest

from tests.faults import secret_scan
from tests.k8s import gateway_api, kube, prometheus_operator
from tests.k8s.netpol import Peer, allowed, pod_peer

VERSIONS = ["1.30.0", "1.37.0"]
COMMENTED = "# components:\n#   - components/metrics\n"


@pytest.fixture(scope="module")
def rendered_metrics(kubectl, tmp_path_factory) -> list[dict]:
    base = kube.copy_of_base(tmp_path_factory.mktemp("k8s") / "k8s")
    text = (base / "kustomization.yaml").read_text()
    assert COMMENTED in text, "kustomization.yaml no longer shows how to enable the metrics component"
    (base / "kustomization.yaml").write_text(text.replace(COMMENTED, "components:\n  - components/metrics\n"))
    return kube.render(base)


def service_monitor(objects) -> dict:
    return kube.find(objects, "ServiceMonitor", "chat-web")


def test_the_component_adds_a_service_monitor_a_policy_and_the_token(rendered, rendered_metrics):
    before = {(o["kind"], o["metadata"]["name"]) for o in rendered}
    after = {(o["kind"], o["metadata"]["name"]) for o in rendered_metrics}
    assert after - before == {("ServiceMonitor", "chat-web"), ("NetworkPolicy", "chat-web-from-prometheus")}
    assert before - after == set()
    for obj in rendered_metrics:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "chat", obj["metadata"]


def test_the_service_monitor_validates_against_the_published_schema(rendered_metrics):
    monitors = [o for o in rendered_metrics if prometheus_operator.is_prometheus_operator(o)]
    assert [m["kind"] for m in monitors] == ["ServiceMonitor"]
    assert prometheus_operator.problems(monitors) == []


@pytest.mark.parametrize("change, named", [
    (lambda sm: sm["spec"]["endpoints"][0].update(interval="fifteen seconds"), "/spec/endpoints/0/interval"),
    (lambda sm: sm["spec"]["endpoints"][0].update(scheme="ftp"), "/spec/endpoints/0/scheme"),
    (lambda sm: sm["spec"]["endpoints"][0]["authorization"]["credentials"].pop("key"), "credentials"),
    (lambda sm: sm["spec"]["endpoints"][0].update(bearerToken="x"), "/spec/endpoints/0/bearerToken"),
    (lambda sm: sm["spec"].update(endpoint=[]), "/spec/endpoint"),
], ids=["duration", "scheme-enum", "credentials-key", "unknown-field", "misspelled-field"])
def test_the_validator_rejects_a_broken_service_monitor(rendered_metrics, change, named):
    broken = copy.deepcopy(service_monitor(rendered_metrics))
    change(broken)
    found = prometheus_operator.problems([broken])
    assert any(named in p for p in found), found


@pytest.mark.parametrize("version", VERSIONS)
def test_the_other_objects_validate_strictly(rendered_metrics, version):
    errors = []
    for obj in rendered_metrics:
        if gateway_api.is_gateway_api(obj) or prometheus_operator.is_prometheus_operator(obj):
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.utils.ValidationError as exc:
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message} at {list(exc.path)}")
    assert not errors, "\n".join(errors)


def test_the_token_comes_from_the_secret_on_both_ends(rendered_metrics):
    endpoint = service_monitor(rendered_metrics)["spec"]["endpoints"][0]
    assert endpoint["authorization"] == {"type": "Bearer", "credentials": {"name": "chat-secrets", "key": "METRICS_TOKEN"}}
    assert "bearerToken" not in endpoint and "bearerTokenFile" not in endpoint
    web = kube.find(rendered_metrics, "Deployment", "chat-web")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in web["env"]}
    assert env["METRICS_TOKEN"] == {"name": "METRICS_TOKEN",
                                    "valueFrom": {"secretKeyRef": {"name": "chat-secrets", "key": "METRICS_TOKEN"}}}
    config = kube.find(rendered_metrics, "ConfigMap")
    assert "METRICS_TOKEN" not in config["data"], "the token belongs in the Secret"
    assert not kube.all_of(rendered_metrics, "Secret")
    assert secret_scan.scan_kubernetes(rendered_metrics, "metrics component") == []
    for doc in (kube.K8S / "secret.example.yaml", kube.K8S / "components" / "metrics" / "kustomization.yaml"):
        assert "METRICS_TOKEN" in doc.read_text(), f"{doc.name} does not say which key to add"


def test_the_service_monitor_finds_the_web_pods_on_their_app_port(rendered_metrics):
    spec = service_monitor(rendered_metrics)["spec"]
    services = [s for s in kube.all_of(rendered_metrics, "Service")
                if kube.selector_matches(spec["selector"], s["metadata"]["labels"])]
    assert [s["metadata"]["name"] for s in services] == ["chat-web"], services
    ports = {p["name"]: p for p in services[0]["spec"]["ports"]}
    endpoint = spec["endpoints"][0]
    assert endpoint["port"] in ports and endpoint["path"] == "/metrics" and endpoint["scheme"] == "http"
    # The Service's port `http` goes to the container port the app listens on (PORT in config.env).
    web = kube.find(rendered_metrics, "Deployment", "chat-web")["spec"]["template"]["spec"]["containers"][0]
    container_ports = {p["name"]: p["containerPort"] for p in web["ports"]}
    config = kube.find(rendered_metrics, "ConfigMap")["data"]
    assert container_ports[ports[endpoint["port"]]["targetPort"]] == int(config["PORT"])


def test_prometheus_reaches_the_app_port_and_nothing_else(rendered_metrics):
    policies = kube.all_of(rendered_metrics, "NetworkPolicy")
    chat_ns = {"kubernetes.io/metadata.name": "chat"}
    web_template = kube.pod_template(kube.find(rendered_metrics, "Deployment", "chat-web"))
    redis_template = kube.pod_template(kube.find(rendered_metrics, "Deployment", "chat-redis"))
    web = pod_peer("web", web_template, "chat", chat_ns)
    redis = pod_peer("redis", redis_template, "chat", chat_ns)
    monitoring = {"kubernetes.io/metadata.name": "monitoring"}
    prometheus = Peer("prometheus", "monitoring", {"app.kubernetes.io/name": "prometheus"}, monitoring)
    grafana = Peer("grafana", "monitoring", {"app.kubernetes.io/name": "grafana"}, monitoring)
    elsewhere = Peer("prometheus-elsewhere", "default", {"app.kubernetes.io/name": "prometheus"},
                     {"kubernetes.io/metadata.name": "default"})
    assert allowed(policies, prometheus, web, 8000)
    assert not allowed(policies, prometheus, redis, 6379)
    assert not allowed(policies, prometheus, web, 9091)
    assert not allowed(policies, grafana, web, 8000)
    assert not allowed(policies, elsewhere, web, 8000)
    # Control: without the component's policy Prometheus is denied (default deny).
    base_only = [p for p in policies if p["metadata"]["name"] != "chat-web-from-prometheus"]
    assert not allowed(base_only, prometheus, web, 8000)
