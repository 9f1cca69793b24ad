"""Run rendered pod specs in Docker the way a kubelet would.

A pod is a "sandbox" container that owns the network namespace (what the
kubelet's pause container does) on a Docker network the test created; every
container of the pod joins it with `--network container:SANDBOX`, so they
share localhost and the pod IP. Service names become network aliases of the
sandbox (Docker's DNS stands in for cluster DNS and the Service VIP).

From the pod spec, and nothing else:
- env: `envFrom` (ConfigMap/Secret data), then `env` in order with
  `valueFrom` (configMapKeyRef, secretKeyRef, fieldRef) and `$(VAR)`
  expansion exactly like the kubelet (`$$` escapes; unknown names stay as is);
  `command`/`args` expanded the same way; `command` replaces the image's
  ENTRYPOINT, `args` its CMD.
- securityContext (pod merged with container): runAsUser/runAsGroup ->
  `--user`, fsGroup/supplementalGroups -> `--group-add`, runAsNonRoot checked
  like the kubelet (a non-numeric or root image user is refused),
  readOnlyRootFilesystem -> `--read-only`, capabilities -> `--cap-drop/--cap-add`,
  allowPrivilegeEscalation: false -> `--security-opt no-new-privileges`,
  seccompProfile RuntimeDefault -> Docker's default profile.
- emptyDir volumes -> one tmpfs Docker volume per pod (shared by its
  containers, sized by sizeLimit); resources.limits -> `--memory`/`--cpus`.
- initContainers run one after another to completion before the containers.
- probes (startup, liveness, readiness) executed as declared: httpGet to the
  pod IP with the declared path, port and headers (success: 200-399, like the
  kubelet), tcpSocket, exec (`docker exec`, with the container's environment).
- termination: the preStop hook, then SIGTERM, then SIGKILL when the
  terminationGracePeriodSeconds run out.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import secrets
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field

from tests.k8s import kube

DOCKER = "docker"
PROBE_USER_AGENT = "kube-probe/1.35"


def sh(*args, check=True, timeout=600, input=None) -> subprocess.CompletedProcess:
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, input=input)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} exited {r.returncode}:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return r


# --- $(VAR) expansion, as k8s.io/kubernetes third_party/forked/golang/expansion -------

def expand(text: str, env: dict) -> str:
    out, i = [], 0
    while i < len(text):
        ch = text[i]
        if ch == "$" and i + 1 < len(text):
            nxt = text[i + 1]
            if nxt == "$":
                out.append("$")
                i += 2
                continue
            if nxt == "(":
                end = text.find(")", i + 2)
                if end != -1:
                    name = text[i + 2:end]
                    out.append(env[name] if name in env else text[i:end + 1])
                    i = end + 1
                    continue
            out.append(ch + nxt)
            i += 2
            continue
        out.append(ch)
        i += 1
    return "".join(out)


class ConfigError(Exception):
    """What the kubelet reports as CreateContainerConfigError."""


def container_env(container: dict, configmaps: dict, secrets_: dict, fields: dict) -> dict:
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        prefix = source.get("prefix", "")
        if "configMapRef" in source:
            ref = source["configMapRef"]
            data = configmaps.get(ref["name"])
            if data is None and not ref.get("optional"):
                raise ConfigError(f"configmap {ref['name']} not found")
            env.update({prefix + k: v for k, v in (data or {}).items()})
        if "secretRef" in source:
            ref = source["secretRef"]
            data = secrets_.get(ref["name"])
            if data is None and not ref.get("optional"):
                raise ConfigError(f"secret {ref['name']} not found")
            env.update({prefix + k: v for k, v in (data or {}).items()})
    for var in container.get("env", []):
        name = var["name"]
        if "valueFrom" not in var:
            env[name] = expand(var.get("value", ""), env)
            continue
        ref = var["valueFrom"]
        if "configMapKeyRef" in ref or "secretKeyRef" in ref:
            kind, store = ("configMapKeyRef", configmaps) if "configMapKeyRef" in ref else ("secretKeyRef", secrets_)
            r = ref[kind]
            data = store.get(r["name"])
            if data is None or r["key"] not in data:
                if r.get("optional"):
                    continue
                raise ConfigError(f"{kind} {r['name']}/{r['key']} not found (env {name})")
            env[name] = data[r["key"]]
        elif "fieldRef" in ref:
            path = ref["fieldRef"]["fieldPath"]
            if path not in fields:
                raise ConfigError(f"fieldRef {path} is not emulated")
            env[name] = fields[path]
        else:
            raise ConfigError(f"valueFrom {list(ref)} is not emulated")
    return env


@dataclass
class Pod:
    name: str
    template: dict
    sandbox: str
    ip: str
    volumes: dict
    env: dict = field(default_factory=dict)          # container name -> environment
    containers: dict = field(default_factory=dict)   # container name -> docker container name
    published: dict = field(default_factory=dict)    # container port -> 127.0.0.1 port

    def spec(self, name: str) -> dict:
        spec = self.template["spec"]
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            if c["name"] == name:
                return c
        raise KeyError(name)


@dataclass
class ProbeResult:
    ok: bool
    detail: str


class Kubelet:
    def __init__(self, prefix: str, network: str, sandbox_image: str, namespace: str = "chat"):
        self.prefix = prefix
        self.network = network
        self.sandbox_image = sandbox_image
        self.namespace = namespace
        self.label = f"chat-k8s-test={prefix}"

    # --- pods -------------------------------------------------------------------

    def create_pod(self, name: str, template: dict, aliases: list[str] = (), publish: list[int] = ()) -> Pod:
        sandbox = f"{self.prefix}-{name}"
        args = [DOCKER, "run", "-d", "--name", sandbox, "--label", self.label, "--hostname", name,
                "--network", self.network, "--read-only", "--cap-drop", "ALL",
                "--security-opt", "no-new-privileges", "--user", "65535:65535", "--memory", "32m"]
        for alias in aliases:
            args += ["--network-alias", alias]
        for port in publish:
            args += ["-p", f"127.0.0.1::{port}"]
        sh(*args, self.sandbox_image, "sleep", "infinity")
        info = json.loads(sh(DOCKER, "inspect", sandbox).stdout)[0]
        ip = info["NetworkSettings"]["Networks"][self.network]["IPAddress"]
        published = {}
        for port in publish:
            binding = info["NetworkSettings"]["Ports"][f"{port}/tcp"][0]
            assert binding["HostIp"] == "127.0.0.1", binding
            published[port] = int(binding["HostPort"])
        volumes = {}
        for vol in template["spec"].get("volumes", []):
            if "emptyDir" not in vol:
                raise NotImplementedError(f"volume {vol['name']}: only emptyDir is emulated")
            size = vol["emptyDir"].get("sizeLimit", "64Mi")
            docker_vol = f"{sandbox}-{vol['name']}"
            sh(DOCKER, "volume", "create", "--label", self.label, "--driver", "local", "--opt", "type=tmpfs",
               "--opt", "device=tmpfs", "--opt", f"o=size={kube.memory_bytes(size)},mode=1777", docker_vol)
            volumes[vol["name"]] = docker_vol
        return Pod(name, template, sandbox, ip, volumes, published=published)

    def _security(self, pod: Pod, c: dict, image: str) -> list[str]:
        pod_sc = pod.template["spec"].get("securityContext", {})
        sc = {**pod_sc, **c.get("securityContext", {})}
        args = []
        user = sc.get("runAsUser")
        if user is None:
            image_user = json.loads(sh(DOCKER, "image", "inspect", image).stdout)[0]["Config"].get("User") or "0"
            uid = image_user.split(":")[0]
            if sc.get("runAsNonRoot") and (not uid.isdigit() or int(uid) == 0):
                raise ConfigError(f"container has runAsNonRoot and image user {image_user!r} is root or non-numeric")
        else:
            if sc.get("runAsNonRoot") and int(user) == 0:
                raise ConfigError("runAsNonRoot with runAsUser 0")
            group = sc.get("runAsGroup")
            args += ["--user", f"{user}:{group}" if group is not None else str(user)]
        for gid in [pod_sc.get("fsGroup"), *pod_sc.get("supplementalGroups", [])]:
            if gid is not None:
                args += ["--group-add", str(gid)]
        if sc.get("readOnlyRootFilesystem"):
            args.append("--read-only")
        caps = sc.get("capabilities", {})
        for cap in caps.get("drop", []):
            args += ["--cap-drop", cap]
        for cap in caps.get("add", []):
            args += ["--cap-add", cap]
        if sc.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges"]
        if sc.get("privileged"):
            raise ConfigError("privileged containers are not emulated (and not wanted)")
        seccomp = sc.get("seccompProfile", {}).get("type", "Unconfined")
        if seccomp == "Unconfined":
            args += ["--security-opt", "seccomp=unconfined"]
        elif seccomp != "RuntimeDefault":
            raise ConfigError(f"seccompProfile {seccomp} is not emulated")
        return args

    def start(self, pod: Pod, name: str, configmaps: dict, secrets_: dict, *, detach: bool = True) -> str:
        """Create and start one container of the pod; returns its docker name."""
        c = pod.spec(name)
        image = c["image"]
        fields = {"metadata.name": pod.name, "metadata.namespace": self.namespace, "status.podIP": pod.ip,
                  "spec.serviceAccountName": pod.template["spec"].get("serviceAccountName", "default")}
        env = container_env(c, configmaps, secrets_, fields)
        pod.env[name] = env
        docker_name = f"{pod.sandbox}-{name}"
        args = [DOCKER, "create", "--name", docker_name, "--label", self.label,
                "--network", f"container:{pod.sandbox}"]
        args += self._security(pod, c, image)
        limits = c.get("resources", {}).get("limits", {})
        if "memory" in limits:
            args += ["--memory", str(kube.memory_bytes(limits["memory"]))]
        if "cpu" in limits:
            args += ["--cpus", str(kube.cpu_cores(limits["cpu"]))]
        for mount in c.get("volumeMounts", []):
            spec = f"{pod.volumes[mount['name']]}:{mount['mountPath']}"
            args += ["-v", spec + (":ro" if mount.get("readOnly") else "")]
        if c.get("workingDir"):
            args += ["-w", c["workingDir"]]
        env_file = tempfile.NamedTemporaryFile("w", prefix="k8s-env-", delete=False)
        try:
            for key, value in env.items():
                if "\n" in value:
                    raise ConfigError(f"env {key} holds a newline (not expressible in a docker env file)")
                env_file.write(f"{key}={value}\n")
            env_file.close()
            args += ["--env-file", env_file.name]
            command = [expand(x, env) for x in c.get("command", [])]
            cargs = [expand(x, env) for x in c.get("args", [])]
            if command:
                args += ["--entrypoint", command[0], image, *command[1:], *cargs]
            else:
                args += [image, *cargs]
            sh(*args)
        finally:
            os.unlink(env_file.name)
        pod.containers[name] = docker_name
        if detach:
            sh(DOCKER, "start", docker_name)
        else:
            sh(DOCKER, "start", "-a", docker_name, check=False, timeout=900)
        return docker_name

    def wait_exit(self, docker_name: str, timeout: float) -> int | None:
        """Exit code, or None if still running after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = json.loads(sh(DOCKER, "inspect", docker_name).stdout)[0]["State"]
            if state["Status"] in ("exited", "dead"):
                return state["ExitCode"]
            time.sleep(0.3)
        return None

    def run_to_completion(self, pod: Pod, name: str, configmaps: dict, secrets_: dict, timeout: float = 300) -> int:
        docker_name = self.start(pod, name, configmaps, secrets_)
        code = self.wait_exit(docker_name, timeout)
        assert code is not None, f"{name} still running after {timeout}s:\n{self.logs(docker_name)}"
        return code

    def logs(self, docker_name: str) -> str:
        r = sh(DOCKER, "logs", "--tail", "200", docker_name, check=False)
        return r.stdout + r.stderr

    def running(self, docker_name: str) -> bool:
        r = sh(DOCKER, "inspect", "-f", "{{.State.Running}}", docker_name, check=False)
        return r.stdout.strip() == "true"

    # --- probes --------------------------------------------------------------------

    def _port(self, pod: Pod, c: dict, port) -> int:
        if isinstance(port, int):
            return port
        for p in c.get("ports", []):
            if p.get("name") == port:
                return p["containerPort"]
        raise ConfigError(f"named port {port} not found in container {c['name']}")

    def probe(self, pod: Pod, name: str, probe: dict, headers_override: dict | None = None) -> ProbeResult:
        c = pod.spec(name)
        timeout = probe.get("timeoutSeconds", 1)
        if "httpGet" in probe:
            action = probe["httpGet"]
            host = action.get("host") or pod.ip
            port = self._port(pod, c, action["port"])
            if action.get("scheme", "HTTP") != "HTTP":
                raise ConfigError("only HTTP probes are emulated")
            headers = {"Host": f"{host}:{port}", "User-Agent": PROBE_USER_AGENT, "Accept": "*/*"}
            for h in action.get("httpHeaders", []):
                # Go canonicalises header names; a declared Host replaces the URL's.
                headers["Host" if h["name"].lower() == "host" else h["name"]] = h["value"]
            headers.update(headers_override or {})
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
            try:
                conn.putrequest("GET", action.get("path", "/"), skip_host=True, skip_accept_encoding=True)
                for k, v in headers.items():
                    conn.putheader(k, v)
                conn.endheaders()
                resp = conn.getresponse()
                body = resp.read(300)
                ok = 200 <= resp.status < 400
                return ProbeResult(ok, f"HTTP {resp.status} {body[:200]!r}")
            except OSError as exc:
                return ProbeResult(False, f"{type(exc).__name__}: {exc}")
            finally:
                conn.close()
        if "tcpSocket" in probe:
            port = self._port(pod, c, probe["tcpSocket"]["port"])
            try:
                socket.create_connection((probe["tcpSocket"].get("host") or pod.ip, port), timeout=timeout).close()
                return ProbeResult(True, f"tcp {port} open")
            except OSError as exc:
                return ProbeResult(False, f"tcp {port}: {exc}")
        if "exec" in probe:
            try:
                r = sh(DOCKER, "exec", pod.containers[name], *probe["exec"]["command"], check=False, timeout=timeout + 1)
            except subprocess.TimeoutExpired:
                return ProbeResult(False, "exec timed out")
            return ProbeResult(r.returncode == 0, f"exit {r.returncode} {(r.stdout + r.stderr)[-200:]!r}")
        raise ConfigError(f"probe {list(probe)} is not emulated")

    def wait_started(self, pod: Pod, name: str) -> float:
        """Run the startupProbe as the kubelet does; fail when failureThreshold is used up."""
        probe = pod.spec(name).get("startupProbe")
        start = time.monotonic()
        if not probe:
            return 0.0
        time.sleep(probe.get("initialDelaySeconds", 0))
        failures, last = 0, None
        while True:
            tick = time.monotonic()
            last = self.probe(pod, name, probe)
            if last.ok:
                return time.monotonic() - start
            failures += 1
            if failures >= probe.get("failureThreshold", 3):
                raise AssertionError(f"{pod.name}/{name}: startupProbe failed {failures} times (last: {last.detail}); "
                                     f"the kubelet would restart it.\n{self.logs(pod.containers[name])}")
            if not self.running(pod.containers[name]):
                raise AssertionError(f"{pod.name}/{name} exited during start-up:\n{self.logs(pod.containers[name])}")
            time.sleep(max(0.0, probe.get("periodSeconds", 10) - (time.monotonic() - tick)))

    def wait_ready(self, pod: Pod, name: str, timeout: float = 60) -> ProbeResult:
        probe = pod.spec(name)["readinessProbe"]
        deadline = time.monotonic() + timeout
        needed, streak, last = probe.get("successThreshold", 1), 0, None
        while time.monotonic() < deadline:
            last = self.probe(pod, name, probe)
            streak = streak + 1 if last.ok else 0
            if streak >= needed:
                return last
            time.sleep(probe.get("periodSeconds", 10))
        raise AssertionError(f"{pod.name}/{name} never became ready (last: {last and last.detail}):\n{self.logs(pod.containers[name])}")

    # --- termination ------------------------------------------------------------------

    def terminate(self, pod: Pod, name: str) -> tuple[int | None, float, bool]:
        """preStop, SIGTERM, then SIGKILL at the grace period. Returns (exit code, seconds, killed)."""
        grace = pod.template["spec"].get("terminationGracePeriodSeconds", 30)
        start = time.monotonic()
        docker_name = pod.containers[name]
        pre_stop = pod.spec(name).get("lifecycle", {}).get("preStop")
        if pre_stop:
            if "sleep" in pre_stop:
                time.sleep(min(pre_stop["sleep"]["seconds"], grace))
            elif "exec" in pre_stop:
                sh(DOCKER, "exec", docker_name, *pre_stop["exec"]["command"], check=False, timeout=grace)
            else:
                raise ConfigError(f"preStop {list(pre_stop)} is not emulated")
        sh(DOCKER, "kill", "-s", "TERM", docker_name, check=False)
        remaining = max(0.0, grace - (time.monotonic() - start))
        code = self.wait_exit(docker_name, remaining)
        killed = False
        if code is None:
            sh(DOCKER, "kill", "-s", "KILL", docker_name, check=False)
            killed = True
            code = self.wait_exit(docker_name, 10)
        return code, time.monotonic() - start, killed

    # --- cleanup ----------------------------------------------------------------------

    def cleanup(self) -> None:
        ids = sh(DOCKER, "ps", "-aq", "--filter", f"label={self.label}", check=False).stdout.split()
        if ids:
            sh(DOCKER, "rm", "-f", "-v", *ids, check=False)
        vols = sh(DOCKER, "volume", "ls", "-q", "--filter", f"label={self.label}", check=False).stdout.split()
        if vols:
            sh(DOCKER, "volume", "rm", "-f", *vols, check=False)


class Watch(threading.Thread):
    """Liveness and readiness probes at their declared periods, acting as the
    kubelet does: readiness failing `failureThreshold` times in a row takes
    the pod out of the Service's endpoints (`ready` False) until
    `successThreshold` successes bring it back; liveness failing
    `failureThreshold` times restarts the container (`docker restart`, with
    the grace period) when `act` is set. Every decision is in `events`.

    `probes` replaces the declared probes (a control: "what would the kubelet
    do with these?"); such a watch should not act."""

    def __init__(self, kubelet: Kubelet, pod: Pod, name: str, *, act: bool = False, probes: dict | None = None,
                 label: str | None = None):
        super().__init__(daemon=True)
        self.kubelet, self.pod, self.name, self.act = kubelet, pod, name, act
        self.label = label or pod.name
        self.stop = threading.Event()
        self.events: list[tuple[float, str]] = []
        self.counts = {"livenessProbe": [0, 0], "readinessProbe": [0, 0]}  # [ok, failed]
        self.ready = True
        self.restarts = 0
        spec = pod.spec(name)
        self.probes = probes if probes is not None else {k: spec[k] for k in ("livenessProbe", "readinessProbe") if k in spec}

    def run(self):
        due = {kind: time.monotonic() for kind in self.probes}
        fails = {kind: 0 for kind in due}
        oks = {kind: 0 for kind in due}
        while not self.stop.is_set():
            now = time.monotonic()
            for kind, when in due.items():
                if now < when:
                    continue
                probe = self.probes[kind]
                result = self.kubelet.probe(self.pod, self.name, probe)
                self.counts[kind][0 if result.ok else 1] += 1
                fails[kind] = 0 if result.ok else fails[kind] + 1
                oks[kind] = oks[kind] + 1 if result.ok else 0
                if kind == "readinessProbe":
                    if self.ready and fails[kind] >= probe.get("failureThreshold", 3):
                        self.ready = False
                        self.events.append((time.monotonic(), f"{kind} failed {fails[kind]}x ({result.detail}): "
                                                              "out of the Service's endpoints"))
                    elif not self.ready and oks[kind] >= probe.get("successThreshold", 1):
                        self.ready = True
                        self.events.append((time.monotonic(), "ready again: back in the endpoints"))
                elif kind == "livenessProbe" and fails[kind] >= probe.get("failureThreshold", 3):
                    self.events.append((time.monotonic(), f"{kind} failed {fails[kind]}x ({result.detail}): container restart"))
                    self.restarts += 1
                    fails[kind] = 0
                    if self.act:
                        grace = self.pod.template["spec"].get("terminationGracePeriodSeconds", 30)
                        sh(DOCKER, "restart", "-t", str(grace), self.pod.containers[self.name], check=False, timeout=grace + 60)
                due[kind] = now + probe.get("periodSeconds", 10)
            self.stop.wait(0.2)

    def describe(self, t0: float) -> str:
        evs = ", ".join(f"+{t - t0:.1f}s {what}" for t, what in self.events) or "no action"
        return f"{self.label}: probes ok/failed {self.counts}; {evs}"


def unique_prefix() -> str:
    return f"k8stest-{secrets.token_hex(3)}"
