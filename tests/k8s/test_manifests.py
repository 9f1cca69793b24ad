"""deploy/k8s rendered by a real kubectl, validated against the official
schemas of several Kubernetes versions, and policy-checked.

No cluster is needed. What a cluster would add (admission, scheduling, the
CNI enforcing NetworkPolicies) is covered by evaluating the objects here and by
running their pod specs in Docker (test_pods.py).
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.k8s import gateway_api, gateway_api_cel, kube
from tests.k8s.netpol import Peer, allowed, pod_peer
from tests.platforms import windows

# The newest three minors kubernetes-validate knows, and the older ones still
# common in managed clusters (the preStop `sleep` action needs >= 1.30).
VERSIONS = ["1.30.0", "1.31.0", "1.32.0", "1.33.0", "1.34.0", "1.35.0", "1.36.0", "1.37.0"]
EXPECTED_KINDS = {
    ("Namespace", "chat"), ("ServiceAccount", "chat"), ("Deployment", "chat-web"), ("Service", "chat-web"),
    ("Gateway", "chat"), ("HTTPRoute", "chat-web"), ("HTTPRoute", "chat-web-redirect"), ("HorizontalPodAutoscaler", "chat-web"), ("PodDisruptionBudget", "chat-web"),
    ("Job", "chat-migrate"), ("Deployment", "chat-redis"), ("Service", "chat-redis"),
    ("NetworkPolicy", "default-deny"), ("NetworkPolicy", "allow-dns-egress"), ("NetworkPolicy", "chat-web"),
    ("NetworkPolicy", "chat-migrate"), ("NetworkPolicy", "chat-redis"), ("NetworkPolicy", "chat-gateway"),
}
SECRET_NAME = "chat-secrets"
VAR_REF = re.compile(r"(?<!\$)\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def containers(template: dict, init: bool = True) -> list[dict]:
    spec = template["spec"]
    return [*(spec.get("initContainers") or [] if init else []), *spec["containers"]]


def all_templates(objects):
    return [(w, kube.pod_template(w)) for w in kube.workloads(objects)]


# --- rendering -------------------------------------------------------------------

def test_kubectl_is_the_pinned_release(kubectl):
    out = subprocess.run([kubectl, "version", "--client", "-o", "yaml"], capture_output=True, text=True, check=True).stdout
    info = yaml.safe_load(out)
    assert info["clientVersion"]["minor"] == "35", info
    assert info["kustomizeVersion"].startswith("v5."), info


def test_render_has_every_object_in_the_namespace(rendered):
    names = {(o["kind"], o["metadata"]["name"]) for o in rendered if o["kind"] != "ConfigMap"}
    assert names == EXPECTED_KINDS
    for obj in rendered:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == "chat", obj["metadata"]
        assert obj["metadata"]["labels"].get("app.kubernetes.io/part-of") == "chat", obj["metadata"]


def test_no_secret_is_rendered_or_committed(rendered):
    assert not kube.all_of(rendered, "Secret"), "a Secret is part of the kustomization"
    kustomization = yaml.safe_load((kube.K8S / "kustomization.yaml").read_text())
    assert "secret.example.yaml" not in kustomization["resources"]
    assert "secretGenerator" not in kustomization
    example = yaml.safe_load((kube.K8S / "secret.example.yaml").read_text())
    for key, value in example["stringData"].items():
        assert value.startswith("<") and value.endswith(">"), f"{key} in secret.example.yaml holds a value, not a placeholder"


def test_one_object_per_file_and_every_file_listed():
    kustomization = yaml.safe_load((kube.K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    files = {p.name for p in kube.K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert files == listed, f"unlisted: {files - listed}, missing: {listed - files}"
    for path in [*kube.K8S.glob("*.yaml"), *(kube.K8S / "postgres-demo").glob("*.yaml"), *kube.K8S.glob("components/*/*.yaml")]:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        assert len(docs) == 1, f"{path} holds {len(docs)} objects"
    for component in kube.K8S.glob("components/*/kustomization.yaml"):
        spec = yaml.safe_load(component.read_text())
        assert spec["kind"] == "Component"
        used = set(spec.get("resources", [])) | {p["path"] for p in spec.get("patches", [])}
        files = {p.name for p in component.parent.glob("*.yaml")} - {"kustomization.yaml"}
        assert files == used, f"{component.parent.name}: unlisted {files - used}, missing {used - files}"


# --- schemas ----------------------------------------------------------------------

@pytest.mark.parametrize("version", VERSIONS)
def test_every_object_validates_strictly(rendered, rendered_demo, rendered_ingress_nginx, version):
    errors = []
    for obj in [*rendered, *rendered_demo, *rendered_ingress_nginx]:
        if gateway_api.is_gateway_api(obj):
            continue  # not in Kubernetes' schemas: test_gateway_api_objects_validate_against_the_published_schemas
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.utils.ValidationError as exc:
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message} at {list(exc.path)}")
    assert not errors, "\n".join(errors)


def test_the_validator_rejects_a_broken_object(rendered):
    """The schema check can fail: an unknown field and a wrong type are caught."""
    import copy

    web = copy.deepcopy(kube.find(rendered, "Deployment", "chat-web"))
    web["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["hostHeader"] = "x"
    with pytest.raises(kubernetes_validate.utils.ValidationError):
        kubernetes_validate.validate(web, VERSIONS[-1], strict=True)
    web = copy.deepcopy(kube.find(rendered, "Deployment", "chat-web"))
    web["spec"]["minReadySeconds"] = "five"
    with pytest.raises(kubernetes_validate.utils.ValidationError):
        kubernetes_validate.validate(web, VERSIONS[0], strict=True)


# --- every container: hardened, limited, probed ------------------------------------------

def test_every_container_is_hardened_and_limited(rendered, rendered_demo):
    problems = []
    for workload, template in all_templates([*rendered, *rendered_demo]):
        pod_sc = template["spec"].get("securityContext", {})
        where = f"{workload['kind']}/{workload['metadata']['name']}"
        if template["spec"].get("automountServiceAccountToken") is not False:
            problems.append(f"{where}: service account token mounted")
        for c in containers(template):
            sc = c.get("securityContext", {})
            merged = {**pod_sc, **sc}
            name = f"{where}/{c['name']}"
            if merged.get("runAsNonRoot") is not True:
                problems.append(f"{name}: runAsNonRoot is not true")
            if not isinstance(merged.get("runAsUser"), int) or merged["runAsUser"] == 0:
                problems.append(f"{name}: no numeric non-zero runAsUser")
            if sc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{name}: root file system is writable")
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{name}: privilege escalation allowed")
            if sc.get("capabilities", {}).get("drop") != ["ALL"] or sc.get("capabilities", {}).get("add"):
                problems.append(f"{name}: capabilities not dropped")
            if merged.get("seccompProfile", {}).get("type") != "RuntimeDefault":
                problems.append(f"{name}: seccomp is not RuntimeDefault")
            if sc.get("privileged"):
                problems.append(f"{name}: privileged")
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    if resource not in res.get(kind, {}):
                        problems.append(f"{name}: no {kind}.{resource}")
            if "limits" in res and "requests" in res:
                if kube.memory_bytes(res["requests"]["memory"]) > kube.memory_bytes(res["limits"]["memory"]):
                    problems.append(f"{name}: memory request above limit")
                if kube.cpu_cores(res["requests"]["cpu"]) > kube.cpu_cores(res["limits"]["cpu"]):
                    problems.append(f"{name}: cpu request above limit")
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
            if "/tmp" not in mounts or "emptyDir" not in volumes.get(mounts["/tmp"], {}):
                problems.append(f"{name}: /tmp is not an emptyDir")
            for m in c.get("volumeMounts", []):
                if m["name"] not in volumes and not any(
                        t["metadata"]["name"] == m["name"] for t in workload["spec"].get("volumeClaimTemplates", [])):
                    problems.append(f"{name}: mounts unknown volume {m['name']}")
            if ":" not in c["image"].rsplit("/", 1)[-1] and "@" not in c["image"]:
                problems.append(f"{name}: image {c['image']} has no tag")
    assert not problems, "\n".join(problems)


def test_long_running_containers_have_probes_on_real_ports(rendered, rendered_demo):
    problems = []
    for workload, template in all_templates([*rendered, *rendered_demo]):
        if workload["kind"] in ("Job", "CronJob"):
            continue  # run to completion; the API forbids probes on init containers
        for c in template["spec"]["containers"]:
            name = f"{workload['metadata']['name']}/{c['name']}"
            ports = {p["name"]: p["containerPort"] for p in c.get("ports", []) if "name" in p}
            numbers = {p["containerPort"] for p in c.get("ports", [])}
            for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
                probe = c.get(kind)
                if not probe:
                    problems.append(f"{name}: no {kind}")
                    continue
                action = probe.get("httpGet") or probe.get("tcpSocket")
                if action:
                    port = action["port"]
                    if (isinstance(port, str) and port not in ports) or (isinstance(port, int) and port not in numbers):
                        problems.append(f"{name}: {kind} port {port} is not a container port")
                if "httpGet" in probe:
                    # The kubelet sends the pod IP as Host; the health paths answer any
                    # Host (app/probes.py), so a Host override would only hide that.
                    headers = {h["name"].lower(): h["value"] for h in probe["httpGet"].get("httpHeaders", [])}
                    if "host" in headers:
                        problems.append(f"{name}: {kind} overrides Host ({headers['host']!r}): not needed")
                    if probe["httpGet"].get("path") not in ("/healthz", "/readyz", "/startupz"):
                        problems.append(f"{name}: {kind} probes {probe['httpGet'].get('path')}, not a health path")
    assert not problems, "\n".join(problems)


def test_web_probes_are_the_right_endpoints(rendered):
    web = kube.find(rendered, "Deployment", "chat-web")["spec"]["template"]["spec"]["containers"][0]
    assert web["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert web["startupProbe"]["httpGet"]["path"] == "/healthz"
    # Readiness decides Service endpoints and the rollout: dependencies once
    # (a new pod must reach them), then the process only (no cascade).
    assert web["readinessProbe"]["httpGet"]["path"] == "/startupz"
    # Until it passed once it is /readyz: two checks of up to 2 s each.
    assert web["readinessProbe"]["timeoutSeconds"] >= 4


# --- the web Deployment -----------------------------------------------------------------

def test_web_runs_the_bare_gunicorn_on_port(rendered):
    deploy = kube.find(rendered, "Deployment", "chat-web")
    web = deploy["spec"]["template"]["spec"]["containers"][0]
    assert web["command"] == ["gunicorn"] and "args" not in web
    config = kube.config_data(rendered)
    assert config["DEBUG"] == "False"
    assert [p["containerPort"] for p in web["ports"]] == [int(config["PORT"])]
    job = kube.find(rendered, "Job", "chat-migrate")
    assert job["spec"]["template"]["spec"]["containers"][0]["command"] == ["python", "manage.py", "migrate", "--noinput"]
    for _, template in all_templates(rendered):
        for c in containers(template):
            text = " ".join([*c.get("command", []), *c.get("args", [])])
            assert not re.search(r"gunicorn\s+-", text), f"{c['name']} spells gunicorn flags: {text}"


def test_rollout_shape(rendered):
    deploy = kube.find(rendered, "Deployment", "chat-web")
    spec = deploy["spec"]
    assert "replicas" not in spec, "replicas belongs to the HPA"
    assert spec["strategy"]["type"] == "RollingUpdate" and spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod = spec["template"]["spec"]
    config = kube.config_data(rendered)
    graceful = windows.gunicorn_graceful_timeout(config)
    web = pod["containers"][0]
    pre_stop = web["lifecycle"]["preStop"]
    sleep = pre_stop["sleep"]["seconds"] if "sleep" in pre_stop else None
    assert sleep and sleep >= 5, pre_stop
    assert pod["terminationGracePeriodSeconds"] > sleep + graceful, (pod["terminationGracePeriodSeconds"], sleep, graceful)
    labels = spec["template"]["metadata"]["labels"]
    hostname = [t for t in pod["topologySpreadConstraints"] if t["topologyKey"] == "kubernetes.io/hostname"]
    assert hostname and kube.selector_matches(hostname[0]["labelSelector"], labels)
    assert kube.selector_matches(spec["selector"], labels)


def test_hpa_and_pdb_govern_the_web_pods(rendered):
    deploy = kube.find(rendered, "Deployment", "chat-web")
    labels = deploy["spec"]["template"]["metadata"]["labels"]
    hpa = kube.find(rendered, "HorizontalPodAutoscaler", "chat-web")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"], target["apiVersion"]) == ("Deployment", "chat-web", "apps/v1")
    assert hpa["apiVersion"] == "autoscaling/v2" and hpa["spec"]["minReplicas"] >= 2
    pdb = kube.find(rendered, "PodDisruptionBudget", "chat-web")
    assert kube.selector_matches(pdb["spec"]["selector"], labels)
    others = [kube.pod_template(w)["metadata"]["labels"] for w in kube.workloads(rendered) if w is not deploy]
    assert not any(kube.selector_matches(pdb["spec"]["selector"], other) for other in others)
    # A PDB that allows no disruption with minReplicas pods would block node drains.
    assert pdb["spec"].get("maxUnavailable", 0) >= 1 or pdb["spec"].get("minAvailable", 0) < hpa["spec"]["minReplicas"]


def test_config_change_renames_the_configmap_and_rolls_the_pods(rendered, tmp_path, kubectl):
    copy = kube.copy_of_base(tmp_path / "k8s")
    env = (copy / "config.env").read_text()
    assert "\nLOG_LEVEL=info\n" in env
    (copy / "config.env").write_text(env.replace("\nLOG_LEVEL=info\n", "\nLOG_LEVEL=debug\n"))
    changed = kube.render(copy)
    old = kube.find(rendered, "Deployment", "chat-web")["spec"]["template"]
    new = kube.find(changed, "Deployment", "chat-web")["spec"]["template"]
    old_cm = old["spec"]["containers"][0]["envFrom"][0]["configMapRef"]["name"]
    new_cm = new["spec"]["containers"][0]["envFrom"][0]["configMapRef"]["name"]
    assert old_cm != new_cm and old_cm.startswith("chat-config-") and new_cm.startswith("chat-config-")
    assert old != new, "a config change must change the pod template (and so roll the pods)"


# --- references: ConfigMap/Secret keys, ports, Services --------------------------------------

def documented_secret_keys() -> set[str]:
    example = yaml.safe_load((kube.K8S / "secret.example.yaml").read_text())
    keys = set(example["stringData"])
    text = (kube.K8S / "secret.example.yaml").read_text()
    create = re.findall(r"--from-literal=([A-Z_]+)=", text)
    assert set(create) == keys, f"the kubectl create secret line ({create}) and the example ({keys}) disagree"
    readme = kube.K8S / "README.md"
    if readme.exists():
        documented = set(re.findall(r"--from-literal=([A-Z_]+)=", readme.read_text()))
        assert keys <= documented <= keys | demo_secret_keys(), f"README.md's create lines ({documented}) and the example ({keys}) disagree"
    return keys


def demo_secret_keys() -> set[str]:
    """Extra keys the demo PostgreSQL needs, as its kustomization.yaml documents them."""
    text = (kube.K8S / "postgres-demo" / "kustomization.yaml").read_text()
    return set(re.findall(r"\b(POSTGRES_[A-Z_]+)\b", text))


def kubelet_env(container: dict, configmaps: dict, secret_keys: set) -> tuple[dict, list[str]]:
    """The names a container's environment will hold, plus reference errors."""
    env, errors = {}, []
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            name = source["configMapRef"]["name"]
            if name not in configmaps:
                errors.append(f"{container['name']}: envFrom ConfigMap {name} does not exist")
            env.update({k: v for k, v in configmaps.get(name, {}).items()})
        if "secretRef" in source:
            errors.append(f"{container['name']}: envFrom a whole Secret (keys cannot be checked)")
    for var in container.get("env", []):
        ref = var.get("valueFrom", {})
        if "configMapKeyRef" in ref:
            r = ref["configMapKeyRef"]
            if r["key"] not in configmaps.get(r["name"], {}):
                errors.append(f"{container['name']}: ConfigMap {r['name']} has no key {r['key']}")
        if "secretKeyRef" in ref:
            r = ref["secretKeyRef"]
            if r["name"] != SECRET_NAME or r["key"] not in secret_keys:
                errors.append(f"{container['name']}: Secret {r['name']} key {r['key']} is not documented")
        for name in VAR_REF.findall(var.get("value", "")):
            if name not in env:
                errors.append(f"{container['name']}: $({name}) in {var['name']} is not defined before it")
        env[var["name"]] = var.get("value", "<ref>")
    for arg in [*container.get("command", []), *container.get("args", [])]:
        for name in VAR_REF.findall(arg):
            if name not in env:
                errors.append(f"{container['name']}: $({name}) in its command/args is not defined")
    return env, errors


def test_every_referenced_key_exists(rendered, rendered_demo):
    secret_keys = documented_secret_keys()
    demo_keys = demo_secret_keys()
    configmaps = {o["metadata"]["name"]: o.get("data", {}) for o in rendered if o["kind"] == "ConfigMap"}
    errors = []
    for objects, keys in ((rendered, secret_keys), (rendered_demo, secret_keys | demo_keys)):
        used = set()
        for _, template in all_templates(objects):
            for c in containers(template):
                _, errs = kubelet_env(c, configmaps, keys)
                errors += errs
                used |= {v["valueFrom"]["secretKeyRef"]["key"] for v in c.get("env", []) if "secretKeyRef" in v.get("valueFrom", {})}
        if objects is rendered:
            assert used == secret_keys, f"documented but unused: {secret_keys - used}; used but undocumented: {used - secret_keys}"
        else:
            assert used == demo_keys, f"the demo uses {used}, documents {demo_keys}"
    assert not errors, "\n".join(errors)


def test_configmap_holds_no_secret(rendered):
    for key in kube.config_data(rendered):
        assert not re.search(r"SECRET|PASSWORD|TOKEN|DATABASE_URL|REDIS_URL", key), key


def test_services_select_exactly_their_pods_on_real_ports(rendered, rendered_demo):
    objects = [*rendered, *rendered_demo]
    pods = {w["metadata"]["name"]: kube.pod_template(w) for w in kube.workloads(objects) if w["kind"] != "Job"}
    pods["chat-migrate"] = kube.pod_template(kube.find(rendered, "Job", "chat-migrate"))
    for service in kube.all_of(objects, "Service"):
        selected = [n for n, t in pods.items() if kube.service_selects(service, t["metadata"]["labels"])]
        assert selected == [service["metadata"]["name"]], f"Service {service['metadata']['name']} selects {selected}"
        template = pods[selected[0]]
        named = {p["name"] for c in template["spec"]["containers"] for p in c.get("ports", []) if "name" in p}
        numbers = {p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert target in (named if isinstance(target, str) else numbers), f"{service['metadata']['name']}: targetPort {target}"


def test_redis_url_points_at_the_redis_service(rendered):
    web = kube.find(rendered, "Deployment", "chat-web")["spec"]["template"]["spec"]["containers"][0]
    url = next(v["value"] for v in web["env"] if v["name"] == "REDIS_URL")
    match = re.fullmatch(r"redis://:\$\(REDIS_PASSWORD\)@([a-z0-9-]+):(\d+)/\d+", url)
    assert match, url
    service = kube.find(rendered, "Service", match.group(1))
    assert int(match.group(2)) in [p["port"] for p in service["spec"]["ports"]]
    redis = kube.find(rendered, "Deployment", "chat-redis")
    assert kube.service_selects(service, redis["spec"]["template"]["metadata"]["labels"])
    args = redis["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert args[args.index("--save") + 1] == "" and args[args.index("--appendonly") + 1] == "no"


def test_gateway_routes_the_public_host_to_the_web_service_without_a_request_deadline(rendered):
    hosts = [h.strip() for h in kube.config_data(rendered)["ALLOWED_HOSTS"].split(",")]
    gateway = kube.find(rendered, "Gateway", "chat")
    listeners = {l["name"]: l for l in gateway["spec"]["listeners"]}
    assert listeners["https"]["protocol"] == "HTTPS" and listeners["https"]["tls"]["mode"] == "Terminate"
    assert listeners["https"]["hostname"] == hosts[0], "the first ALLOWED_HOSTS entry is the public host (Site domain)"
    route = kube.find(rendered, "HTTPRoute", "chat-web")
    assert route["spec"]["hostnames"] == [hosts[0]]
    assert route["spec"]["parentRefs"] == [{"name": "chat", "sectionName": "https"}]
    rule = route["spec"]["rules"][0]
    backend = rule["backendRefs"][0]
    service = kube.find(rendered, "Service", backend["name"])
    assert backend["port"] in [p["port"] for p in service["spec"]["ports"]]
    # Websockets live for hours: no per-request deadline at the gateway.
    assert rule["timeouts"]["request"] == "0s" and "backendRequest" not in rule["timeouts"]
    redirect = kube.find(rendered, "HTTPRoute", "chat-web-redirect")
    assert redirect["spec"]["parentRefs"] == [{"name": "chat", "sectionName": "http"}]
    assert redirect["spec"]["rules"][0]["filters"] == [{"type": "RequestRedirect", "requestRedirect": {"scheme": "https", "statusCode": 301}}]


def test_gateway_api_objects_validate_against_the_published_schemas(rendered, rendered_demo, rendered_ingress_nginx):
    """Every Gateway API object any kustomization renders, through the schema
    validators of @kubernetes-models/gateway-api, unknown fields included."""
    objects = [o for o in [*rendered, *rendered_demo, *rendered_ingress_nginx] if gateway_api.is_gateway_api(o)]
    assert {(o["kind"], o["metadata"]["name"]) for o in objects} == {
        ("Gateway", "chat"), ("HTTPRoute", "chat-web"), ("HTTPRoute", "chat-web-redirect")}
    results = gateway_api.validate(objects)
    assert [r["model"] for r in results] == [f"@kubernetes-models/gateway-api/{o['apiVersion']}/{o['kind']}" for o in objects]
    problems = [f"{r['kind']}/{r['name']}: {p}" for r in results for p in [*r["errors"], *r["unknownFields"]]]
    assert not problems, "\n".join(problems)


def broken(rendered, kind, name, change):
    import copy

    obj = copy.deepcopy(kube.find(rendered, kind, name))
    change(obj)
    return obj


# (kind, name, change, paths the schema must reject, fields it must call unknown)
BROKEN_GATEWAY_API = {
    "route timeout not a duration": ("HTTPRoute", "chat-web", lambda r: r["spec"]["rules"][0]["timeouts"].update(request="forever"),
                                     ["/spec/rules/0/timeouts/request"], []),
    "route backend port out of range": ("HTTPRoute", "chat-web", lambda r: r["spec"]["rules"][0]["backendRefs"][0].update(port=70000),
                                        ["/spec/rules/0/backendRefs/0/port"], []),
    "route hostname not lower case": ("HTTPRoute", "chat-web", lambda r: r["spec"].update(hostnames=["Chat.Example.com"]),
                                      ["/spec/hostnames/0"], []),
    "route redirect status not a redirect": ("HTTPRoute", "chat-web-redirect",
                                             lambda r: r["spec"]["rules"][0]["filters"][0]["requestRedirect"].update(statusCode=200),
                                          ["/spec/rules/0/filters/0/requestRedirect/statusCode"], []),
    # The package's schemas accept unknown fields; the field-name check does not.
    "route 'timeout' for 'timeouts'": ("HTTPRoute", "chat-web", lambda r: r["spec"]["rules"][0].update(timeout={"request": "0s"}),
                                       [], ["/spec/rules/0/timeout"]),
    "route timeouts.idle (not in v1)": ("HTTPRoute", "chat-web", lambda r: r["spec"]["rules"][0]["timeouts"].update(idle="1h"),
                                        [], ["/spec/rules/0/timeouts/idle"]),
    "route unknown metadata field": ("HTTPRoute", "chat-web", lambda r: r["metadata"].update(label={"a": "b"}),
                                     [], ["/metadata/label"]),
    "gateway listener protocol": ("Gateway", "chat", lambda g: g["spec"]["listeners"][0].update(protocol="HTTP S"),
                                  ["/spec/listeners/0/protocol"], []),
    "gateway listener port 0": ("Gateway", "chat", lambda g: g["spec"]["listeners"][1].update(port=0),
                                ["/spec/listeners/1/port"], []),
    "gateway listener port 65536": ("Gateway", "chat", lambda g: g["spec"]["listeners"][0].update(port=65536),
                                    ["/spec/listeners/0/port"], []),
    "gateway listener port as a string": ("Gateway", "chat", lambda g: g["spec"]["listeners"][0].update(port="443"),
                                          ["/spec/listeners/0/port"], []),
    "gateway tls mode": ("Gateway", "chat", lambda g: g["spec"]["listeners"][0]["tls"].update(mode="Offload"),
                         ["/spec/listeners/0/tls/mode"], []),
    "gateway without a class": ("Gateway", "chat", lambda g: g["spec"].pop("gatewayClassName"), ["/spec"], []),
    "gateway listener unknown field": ("Gateway", "chat", lambda g: g["spec"]["listeners"][0].update(timeout="1h"),
                                       [], ["/spec/listeners/0/timeout"]),
}


@pytest.mark.parametrize("case", BROKEN_GATEWAY_API)
def test_the_published_schemas_reject_a_broken_gateway_api_object(rendered, case):
    """Negative controls, one per run: the broken copy fails at exactly the
    broken path; its unbroken siblings, sent alongside, pass."""
    kind, name, change, error_paths, unknown = BROKEN_GATEWAY_API[case]
    bad = broken(rendered, kind, name, change)
    siblings = [o for o in rendered if gateway_api.is_gateway_api(o)]
    results = gateway_api.validate([*siblings, bad])
    assert [r for r in results[:-1] if r["errors"] or r["unknownFields"]] == []
    result = results[-1]
    assert sorted({e.partition(": ")[0] for e in result["errors"]}) == error_paths, result
    assert result["unknownFields"] == unknown, result


def test_what_the_package_schemas_accept_that_a_standard_channel_crd_refuses(rendered):
    """Pins the limits PROVENANCE.md states: the package's schemas come from the
    Go types, which carry the experimental channel's fields and enum values;
    the standard-channel CRDs of v1.3/v1.4 refused these (statusCode only 301/302,
    no `retry`, no `sessionPersistence`). If a newer package refuses them, this
    fails: update PROVENANCE.md and turn these into negative controls."""
    looser = [
        broken(rendered, "HTTPRoute", "chat-web-redirect",
               lambda r: r["spec"]["rules"][0]["filters"][0]["requestRedirect"].update(statusCode=308)),
        broken(rendered, "HTTPRoute", "chat-web", lambda r: r["spec"]["rules"][0].update(retry={"attempts": 2})),
        broken(rendered, "HTTPRoute", "chat-web", lambda r: r["spec"]["rules"][0].update(sessionPersistence={"sessionName": "s"})),
    ]
    assert [(r["errors"], r["unknownFields"]) for r in gateway_api.validate(looser)] == [([], [])] * 3


def test_an_object_without_a_model_is_an_error_not_a_pass(rendered):
    route = broken(rendered, "HTTPRoute", "chat-web", lambda r: r.update(kind="HTTPRoutes"))
    beta = broken(rendered, "HTTPRoute", "chat-web", lambda r: r.update(apiVersion="gateway.networking.k8s.io/v9"))
    results = gateway_api.validate([route, beta])
    assert all(r["model"] is None and r["errors"] and "no model" in r["errors"][0] for r in results), results


def test_gateway_api_objects_keep_the_crds_cel_rules(rendered):
    """The CEL rules are not run by the schema validators: gateway_api_cel
    restates the ones these objects reach."""
    objects = [o for o in rendered if gateway_api.is_gateway_api(o)]
    problems = [v for o in objects for v in gateway_api_cel.violations(o)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("kind,name,change,named", [
    ("Gateway", "chat", lambda g: g["spec"]["listeners"][1].update(tls={"mode": "Terminate", "certificateRefs": [{"name": "x"}]}),
     "tls must not be specified for protocol HTTP"),
    ("Gateway", "chat", lambda g: g["spec"]["listeners"][1].update(name="https"), "listener name 'https' must be unique"),
    ("Gateway", "chat", lambda g: g["spec"]["listeners"][1].update(port=443, protocol="HTTPS", tls=g["spec"]["listeners"][0]["tls"]),
     "port, protocol and hostname"),
    ("Gateway", "chat", lambda g: g["spec"]["listeners"][0]["tls"].pop("certificateRefs"), "certificateRefs or options"),
    ("HTTPRoute", "chat-web-redirect", lambda r: r["spec"]["rules"][0].update(backendRefs=[{"name": "chat-web", "port": 80}]),
     "RequestRedirect filter must not be used together with backendRefs"),
    ("HTTPRoute", "chat-web", lambda r: r["spec"]["rules"][0]["timeouts"].update(request="10s", backendRequest="1m"),
     "backendRequest timeout cannot be longer than request timeout"),
    ("HTTPRoute", "chat-web", lambda r: r["spec"]["rules"][0]["backendRefs"][0].pop("port"), "must specify port for Service"),
    ("HTTPRoute", "chat-web", lambda r: r["spec"]["rules"][0]["matches"][0]["path"].update(value="/chat/../admin"),
     "not an absolute, normalised path"),
    ("HTTPRoute", "chat-web", lambda r: r["spec"]["parentRefs"].append({"name": "chat"}), "sectionName must be specified"),
    ("HTTPRoute", "chat-web-redirect", lambda r: r["spec"]["rules"][0]["filters"][0].update(type="URLRewrite"),
     "requestRedirect must be specified exactly when type is RequestRedirect"),
])
def test_the_cel_checks_reject_a_broken_object(rendered, kind, name, change, named):
    problems = gateway_api_cel.violations(broken(rendered, kind, name, change))
    assert any(named in p for p in problems), problems


def test_ingress_nginx_component_replaces_the_gateway(rendered, rendered_ingress_nginx):
    kinds = {(o["kind"], o["metadata"]["name"]) for o in rendered_ingress_nginx if o["kind"] != "ConfigMap"}
    base = {(o["kind"], o["metadata"]["name"]) for o in rendered if o["kind"] != "ConfigMap"}
    gateway_api = {("Gateway", "chat"), ("HTTPRoute", "chat-web"), ("HTTPRoute", "chat-web-redirect"),
                   ("NetworkPolicy", "chat-gateway")}
    assert kinds == (base - gateway_api) | {("Ingress", "chat-web"), ("NetworkPolicy", "chat-web-from-ingress-nginx")}
    ingress = kube.find(rendered_ingress_nginx, "Ingress", "chat-web")
    hosts = [h.strip() for h in kube.config_data(rendered)["ALLOWED_HOSTS"].split(",")]
    rule = ingress["spec"]["rules"][0]
    assert rule["host"] == hosts[0] and rule["host"] in ingress["spec"]["tls"][0]["hosts"]
    backend = rule["http"]["paths"][0]["backend"]["service"]
    service = kube.find(rendered_ingress_nginx, "Service", backend["name"])
    assert backend["port"].get("name") in [p.get("name") for p in service["spec"]["ports"]]
    notes = ingress["metadata"]["annotations"]
    for key in ("nginx.ingress.kubernetes.io/proxy-read-timeout", "nginx.ingress.kubernetes.io/proxy-send-timeout"):
        assert int(notes[key]) >= 3600, key


@pytest.mark.parametrize("which", ["base", "ingress-nginx", "postgres-demo"])
def test_no_image_is_latest_or_untagged(rendered, rendered_ingress_nginx, rendered_demo, which):
    """What `kubectl kustomize deploy/k8s` renders names versions only: a
    rollout, a rescheduled pod and a node restart run the same image."""
    objects = {"base": rendered, "ingress-nginx": rendered_ingress_nginx, "postgres-demo": rendered_demo}[which]
    images = [c["image"] for _, t in all_templates(objects) for c in containers(t)]
    assert images
    for image in images:
        name, _, digest = image.partition("@")
        tag = name.rsplit("/", 1)[-1].partition(":")[2]
        assert digest or (tag and tag != "latest"), f"{image}: pin a version or a digest"


def test_the_latest_check_catches_latest(kubectl):
    """Negative control: an overlay that sets newTag: latest is caught."""
    objects = kube.overlay({"images": [{"name": "registry.example.com/chat", "newTag": "latest"}]})
    images = [c["image"] for _, t in all_templates(objects) for c in containers(t)]
    assert "registry.example.com/chat:latest" in images


def test_migration_job_survives_a_second_release(rendered):
    job = kube.find(rendered, "Job", "chat-migrate")
    assert job["spec"]["ttlSecondsAfterFinished"] > 0
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    script = (kube.K8S / "release.sh").read_text()
    commands = [line.strip() for line in script.splitlines() if "$kubectl " in line and not line.strip().startswith("#")]
    delete = next(i for i, c in enumerate(commands) if "delete job chat-migrate" in c)
    apply = next(i for i, c in enumerate(commands) if " apply -k" in c)
    wait_job = next(i for i, c in enumerate(commands) if "job/chat-migrate" in c and "wait" in c)
    rollout = next(i for i, c in enumerate(commands) if "rollout status deployment/chat-web" in c)
    assert delete < apply < wait_job < rollout, commands
    # The web pods themselves wait for the migrations (init container).
    init = kube.find(rendered, "Deployment", "chat-web")["spec"]["template"]["spec"]["initContainers"]
    assert any("migrate --check" in " ".join(c["command"]) for c in init)
    r = subprocess.run(["bash", "-n", str(kube.K8S / "release.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_namespace_enforces_restricted_pod_security(rendered):
    labels = kube.find(rendered, "Namespace", "chat")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


# --- NetworkPolicies, evaluated ----------------------------------------------------------------

def test_network_policies_admit_only_the_intended_flows(rendered, rendered_demo, rendered_ingress_nginx):
    ns_labels = {"kubernetes.io/metadata.name": "chat"}
    pols = kube.all_of(rendered, "NetworkPolicy")
    web = pod_peer("web", kube.pod_template(kube.find(rendered, "Deployment", "chat-web")), "chat", ns_labels)
    redis = pod_peer("redis", kube.pod_template(kube.find(rendered, "Deployment", "chat-redis")), "chat", ns_labels)
    migrate = pod_peer("migrate", kube.pod_template(kube.find(rendered, "Job", "chat-migrate")), "chat", ns_labels)
    gateway = Peer("gateway data plane", "chat", {"gateway.networking.k8s.io/gateway-name": "chat"}, ns_labels)
    other_gateway = Peer("another gateway's pods", "chat", {"gateway.networking.k8s.io/gateway-name": "other"}, ns_labels)
    client = Peer("labelled in-cluster client", "reports", {"chat/web-client": "true"}, {"kubernetes.io/metadata.name": "reports"})
    controller = Peer("ingress-nginx", "ingress-nginx", {"app.kubernetes.io/name": "ingress-nginx"},
                      {"kubernetes.io/metadata.name": "ingress-nginx"})
    stranger = Peer("stranger", "default", {"app": "x"}, {"kubernetes.io/metadata.name": "default"})
    intruder = Peer("intruder", "chat", {"app": "x"}, ns_labels)
    dns = Peer("coredns", "kube-system", {"k8s-app": "kube-dns"}, {"kubernetes.io/metadata.name": "kube-system"})
    database = Peer("managed-postgres", None, ip="10.20.30.40")
    internet = Peer("internet", None, ip="93.184.216.34")

    expect = [
        (internet, gateway, 443, True), (gateway, web, 8000, True), (gateway, redis, 6379, False),
        (gateway, web, 8000, True), (client, web, 8000, True), (stranger, web, 8000, False), (intruder, web, 8000, False),
        (other_gateway, web, 8000, False), (controller, web, 8000, False),
        (gateway, web, 9000, False), (client, web, 9000, False), (gateway, redis, 6379, False), (client, redis, 6379, False),
        (web, redis, 6379, True), (migrate, redis, 6379, False), (intruder, redis, 6379, False),
        (stranger, redis, 6379, False), (redis, web, 8000, False), (web, redis, 6380, False),
        (web, database, 5432, True), (migrate, database, 5432, True), (redis, database, 5432, False),
        (web, internet, 443, False), (migrate, internet, 443, False), (redis, internet, 443, False),
        (intruder, database, 5432, False), (stranger, migrate, 8000, False),
    ]
    for src in (web, redis, migrate, intruder):
        expect += [(src, dns, 53, True)]
    wrong = [f"{s.name} -> {d.name}:{p} expected {'allowed' if ok else 'denied'}"
             for s, d, p, ok in expect if allowed(pols, s, d, p) != ok]
    assert not wrong, "\n".join(wrong)
    assert allowed(pols, web, dns, 53, "UDP")

    # With the ingress-nginx component: its controller reaches the web pods
    # (and nothing else), in-cluster clients still do.
    nginx_pols = kube.all_of(rendered_ingress_nginx, "NetworkPolicy")
    assert allowed(nginx_pols, controller, web, 8000) and allowed(nginx_pols, client, web, 8000)
    assert not allowed(nginx_pols, controller, redis, 6379) and not allowed(nginx_pols, stranger, web, 8000)
    assert not allowed(nginx_pols, controller, web, 9000)

    # With the demo PostgreSQL: web and migrate reach it, nothing else does.
    demo_pols = pols + kube.all_of(rendered_demo, "NetworkPolicy")
    pg = pod_peer("postgres", kube.pod_template(kube.find(rendered_demo, "StatefulSet", "chat-postgres")), "chat", ns_labels)
    assert allowed(demo_pols, web, pg, 5432) and allowed(demo_pols, migrate, pg, 5432)
    assert not allowed(demo_pols, redis, pg, 5432) and not allowed(demo_pols, intruder, pg, 5432)
    assert not allowed(demo_pols, pg, internet, 443)


def test_verify_cluster_script_is_valid_bash():
    script = Path(__file__).with_name("verify_cluster.sh")
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "kubectl://" in script.read_text()
