"""deploy/k8s/components/redis-sentinel, rendered by the real kubectl the way
kustomization.yaml's comment says to enable it, validated like the base:
schemas of 1.30-1.37, hardened containers, probes, keys, Services, the PDB,
NetworkPolicies evaluated, and the settings the web pods get accepted by the
app (REDIS_SENTINELS naming the StatefulSet's pods)."""
from __future__ import annotations

import json
import re

import kubernetes_validate
import pytest
import yaml

from tests.k8s import kube
from tests.k8s import test_manifests as base
from tests.k8s.netpol import Peer, allowed, pod_peer

COMPONENT = kube.K8S / "components" / "redis-sentinel"
ENABLE = "# components:\n#   - components/redis-sentinel\n"


@pytest.fixture(scope="module")
def rendered_sentinel(kubectl, tmp_path_factory) -> list[dict]:
    copy = kube.copy_of_base(tmp_path_factory.mktemp("k8s") / "k8s")
    text = (copy / "kustomization.yaml").read_text()
    assert ENABLE in text, "kustomization.yaml no longer shows how to enable the redis-sentinel component"
    (copy / "kustomization.yaml").write_text(text.replace(ENABLE, "components:\n  - components/redis-sentinel\n"))
    return kube.render(copy)


def component_secret_keys() -> set[str]:
    """Secret keys the component adds, as its kustomization.yaml and the README document them."""
    text = (COMPONENT / "kustomization.yaml").read_text()
    keys = set(re.findall(r"\b(REDIS_SENTINEL_PASSWORD)\b", text))
    readme = (kube.K8S / "README.md").read_text()
    assert re.search(r"patch secret chat-secrets .*REDIS_SENTINEL_PASSWORD", readme), \
        "README.md does not show how to add the sentinels' password to the Secret"
    return keys


def test_component_replaces_the_redis_deployment(rendered, rendered_sentinel):
    kinds = {(o["kind"], o["metadata"]["name"]) for o in rendered_sentinel if o["kind"] != "ConfigMap"}
    before = {(o["kind"], o["metadata"]["name"]) for o in rendered if o["kind"] != "ConfigMap"}
    assert kinds == (before - {("Deployment", "chat-redis"), ("Service", "chat-redis")}) | {
        ("StatefulSet", "chat-redis"), ("Service", "chat-redis-nodes"), ("PodDisruptionBudget", "chat-redis")}
    for obj in rendered_sentinel:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == "chat", obj["metadata"]
        assert obj["metadata"]["labels"].get("app.kubernetes.io/part-of") == "chat", obj["metadata"]


@pytest.mark.parametrize("version", base.VERSIONS)
def test_component_validates_strictly(rendered_sentinel, version):
    errors = []
    for obj in rendered_sentinel:
        if obj["apiVersion"].startswith("gateway.networking.k8s.io/"):
            continue  # the base's Gateway API objects, validated by test_manifests.py
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.utils.ValidationError as exc:
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message} at {list(exc.path)}")
    assert not errors, "\n".join(errors)


def test_component_containers_are_hardened_limited_and_probed(rendered_sentinel):
    base.test_every_container_is_hardened_and_limited(rendered_sentinel, [])
    base.test_long_running_containers_have_probes_on_real_ports(rendered_sentinel, [])
    base.test_no_image_is_latest_or_untagged(rendered_sentinel, rendered_sentinel, rendered_sentinel, "base")


def test_every_referenced_key_exists_and_no_redis_url_is_left(rendered_sentinel):
    keys = base.documented_secret_keys() | component_secret_keys()
    configmaps = {o["metadata"]["name"]: o.get("data", {}) for o in rendered_sentinel if o["kind"] == "ConfigMap"}
    errors, used = [], set()
    for workload, template in base.all_templates(rendered_sentinel):
        for c in base.containers(template):
            env, errs = base.kubelet_env(c, configmaps, keys)
            errors += errs
            used |= {v["valueFrom"]["secretKeyRef"]["key"] for v in c.get("env", []) if "secretKeyRef" in v.get("valueFrom", {})}
            assert "REDIS_URL" not in env, f"{workload['metadata']['name']}/{c['name']} still sets REDIS_URL (the app refuses both)"
            if workload["kind"] == "StatefulSet":  # the component's scripts use backquotes (see its header)
                for text in [*c.get("command", []), *c.get("args", [])]:
                    assert "$(" not in text, f"{c['name']}: $( in its command would be a kubelet variable reference"
    assert not errors, "\n".join(errors)
    assert used == keys, f"documented but unused: {keys - used}; used but undocumented: {used - keys}"
    assert not any(re.search(r"SECRET|PASSWORD|TOKEN|REDIS_URL", k) for k in kube.config_data(rendered_sentinel))


def test_sentinel_addresses_are_the_statefulset_pods(rendered_sentinel):
    sts = kube.find(rendered_sentinel, "StatefulSet", "chat-redis")
    service = kube.find(rendered_sentinel, "Service", sts["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert kube.service_selects(service, sts["spec"]["template"]["metadata"]["labels"])
    ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    config = kube.config_data(rendered_sentinel)
    expected = [f"{sts['metadata']['name']}-{i}.{service['metadata']['name']}:{ports['sentinel']}"
                for i in range(sts["spec"]["replicas"])]
    assert config["REDIS_SENTINELS"].split(",") == expected
    assert sts["spec"]["replicas"] == 3, "three sentinels: a quorum of 2 survives one lost pod"
    # The scripts and the config agree on the names and the service name.
    script = sts["spec"]["template"]["spec"]["containers"][1]["command"][2]
    assert f"sentinel monitor {config['REDIS_SENTINEL_MASTER']} " in script and "sentinel announce-hostnames yes" in script
    assert f".{service['metadata']['name']}" in script
    # Nothing else selects these pods; the PDB keeps a quorum through a drain.
    pdb = kube.find(rendered_sentinel, "PodDisruptionBudget", "chat-redis")
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert kube.selector_matches(pdb["spec"]["selector"], labels) and pdb["spec"]["maxUnavailable"] == 1
    for workload in kube.workloads(rendered_sentinel):
        if workload is not sts:
            assert not kube.selector_matches(pdb["spec"]["selector"], kube.pod_template(workload)["metadata"]["labels"])


def test_network_policies_admit_only_the_sentinel_flows(rendered_sentinel):
    ns = {"kubernetes.io/metadata.name": "chat"}
    pols = kube.all_of(rendered_sentinel, "NetworkPolicy")
    web = pod_peer("web", kube.pod_template(kube.find(rendered_sentinel, "Deployment", "chat-web")), "chat", ns)
    redis = pod_peer("redis", kube.pod_template(kube.find(rendered_sentinel, "StatefulSet", "chat-redis")), "chat", ns)
    migrate = pod_peer("migrate", kube.pod_template(kube.find(rendered_sentinel, "Job", "chat-migrate")), "chat", ns)
    gateway = Peer("gateway data plane", "chat", {"gateway.networking.k8s.io/gateway-name": "chat"}, ns)
    intruder = Peer("intruder", "chat", {"app": "x"}, ns)
    database = Peer("managed-postgres", None, ip="10.20.30.40")
    internet = Peer("internet", None, ip="93.184.216.34")
    dns = Peer("coredns", "kube-system", {"k8s-app": "kube-dns"}, {"kubernetes.io/metadata.name": "kube-system"})
    expect = [
        (web, redis, 6379, True), (web, redis, 26379, True), (redis, redis, 6379, True), (redis, redis, 26379, True),
        (web, redis, 6380, False), (redis, redis, 6380, False), (migrate, redis, 6379, False), (migrate, redis, 26379, False),
        (intruder, redis, 26379, False), (gateway, redis, 26379, False), (redis, web, 8000, False),
        (redis, internet, 443, False), (redis, database, 5432, False), (web, database, 5432, True),
        (web, internet, 443, False), (gateway, web, 8000, True), (redis, dns, 53, True),
    ]
    wrong = [f"{s.name} -> {d.name}:{p} expected {'allowed' if ok else 'denied'}"
             for s, d, p, ok in expect if allowed(pols, s, d, p) != ok]
    assert not wrong, "\n".join(wrong)


def test_the_app_accepts_the_settings_the_web_pods_get(rendered_sentinel):
    """ConfigMap + Secret as the kubelet hands them to the web container:
    app.settings starts and builds a Sentinel channel layer on the three pods."""
    from tests.unit.test_settings import run

    configmaps = {o["metadata"]["name"]: o.get("data", {}) for o in rendered_sentinel if o["kind"] == "ConfigMap"}
    web = kube.find(rendered_sentinel, "Deployment", "chat-web")["spec"]["template"]["spec"]["containers"][0]
    secret = {"SECRET_KEY": "k" * 20 + "abcdefghijklmnopqrstuvwxyz0123456789", "DATABASE_URL": "postgres://u:p@db:5432/chat",
              "REDIS_PASSWORD": "r" * 8 + "0123456789abcdef", "REDIS_SENTINEL_PASSWORD": "s" * 8 + "0123456789abcdef"}
    from tests.k8s.kubelet import container_env

    env = container_env(web, configmaps, {"chat-secrets": secret}, {})
    code = ("import django, json; django.setup(); from django.conf import settings as s; "
            "h = s.CHANNEL_LAYERS['default']['CONFIG']['hosts'][0]; "
            "print(json.dumps([h['sentinels'], h['master_name'], h['password'], h['sentinel_kwargs']['password']]))")
    out = run({**env, "DJANGO_SETTINGS_MODULE": "app.settings"}, code)
    assert out.returncode == 0, out.stderr
    sentinels, master, password, sentinel_password = json.loads(out.stdout)
    assert [f"{h}:{p}" for h, p in sentinels] == env["REDIS_SENTINELS"].split(",")
    assert (master, password, sentinel_password) == ("chat", secret["REDIS_PASSWORD"], secret["REDIS_SENTINEL_PASSWORD"])


def test_release_script_waits_for_either_redis():
    script = (kube.K8S / "release.sh").read_text()
    assert "rollout status statefulset/chat-redis" in script and "rollout status deployment/chat-redis" in script
    assert yaml.safe_load((COMPONENT / "kustomization.yaml").read_text())["kind"] == "Component"
