"""The rendered pods, run here as a kubelet would (tests/k8s/kubelet.py), then
the [A] contract against them.

Order, as on a cluster after `release.sh`: PostgreSQL (stands in for the
managed database of DATABASE_URL) and the Redis pod; the first web pod's
init container, which must keep waiting while migrations are missing; the
migration Job's pod; then two web pods (the HPA's minReplicas), their probes
as declared, the contract through testinfra's docker backend on both replicas
with the black-box checker crossing them, and finally a pod termination
(preStop, SIGTERM, grace period).

The only change to the rendered objects is the image, set the way a user
sets it (a kustomization `images:` entry): the locally built product image.
"""
from __future__ import annotations

import copy
import secrets
import threading
import time

import pytest

from tests.harness.app_image import build_app_image
from tests.harness.contract import run_contract
from tests.harness.debian_image import python_base_image, services_image
from tests.k8s import kube
from tests.k8s.images import redis_image
from tests.k8s.kubelet import Kubelet, Watch, sh, unique_prefix
from tests.platforms.conftest import worktree_tag

BASE_IMAGE = "registry.example.com/chat"


@pytest.fixture(scope="module")
def app_image(k8s_timings) -> str:
    start = time.monotonic()
    tag = build_app_image(worktree_tag())
    k8s_timings["app image"] = time.monotonic() - start
    return tag


@pytest.fixture(scope="module")
def objects(rendered, app_image) -> list[dict]:
    name, _, tag = app_image.rpartition(":")
    out = kube.overlay({"images": [{"name": BASE_IMAGE, "newName": name, "newTag": tag}]})
    # Nothing but the image differs from the plain render.
    def without_images(objs):
        objs = copy.deepcopy(objs)
        for w in kube.workloads(objs):
            spec = kube.pod_template(w)["spec"]
            for c in [*spec.get("initContainers", []), *spec["containers"]]:
                if c["image"].startswith(BASE_IMAGE + ":") or c["image"] == app_image:
                    c["image"] = "<app>"
        return objs
    assert without_images(out) == without_images(rendered)
    return out


@pytest.fixture(scope="module")
def cluster(objects, k8s_timings):
    """The network, the 'managed' PostgreSQL and a Kubelet; everything removed at the end."""
    prefix = unique_prefix()
    network = f"{prefix}-net"
    sh("docker", "network", "create", "--label", f"chat-k8s-test={prefix}", network)
    kubelet = Kubelet(prefix, network, python_base_image())
    try:
        start = time.monotonic()
        pg_password = secrets.token_hex(16)
        pg = postgres(kubelet, services_image(), pg_password)
        public_host = kube.config_data(objects)["ALLOWED_HOSTS"].split(",")[0].strip()
        secret = {  # generated per run; never written to disk
            "SECRET_KEY": secrets.token_urlsafe(50),
            "DATABASE_URL": f"postgres://chat:{pg_password}@managed-db:5432/chat",
            "REDIS_PASSWORD": secrets.token_hex(24),
        }
        configmaps = {o["metadata"]["name"]: o["data"] for o in objects if o["kind"] == "ConfigMap"}
        k8s_timings["postgres"] = time.monotonic() - start
        yield {"kubelet": kubelet, "secrets": {"chat-secrets": secret}, "configmaps": configmaps,
               "public_host": public_host, "pg": pg, "pg_password": pg_password, "pods": {}}
    finally:
        kubelet.cleanup()
        sh("docker", "network", "rm", network, check=False)


def postgres(kubelet: Kubelet, image: str, password: str) -> str:
    name = f"{kubelet.prefix}-managed-db"
    script = f"""
set -e
bin=$(ls -d /usr/lib/postgresql/*/bin | tail -1)
export PGDATA=/tmp/pg
printf '%s\\n' "$PGPASSWORD_INIT" > /tmp/pw
$bin/initdb -U chat --pwfile=/tmp/pw --auth=scram-sha-256 -E UTF8 --locale=C.UTF-8 >/dev/null
rm /tmp/pw
echo "host all all 0.0.0.0/0 scram-sha-256" >> $PGDATA/pg_hba.conf
echo "CREATE DATABASE chat;" | $bin/postgres --single -D $PGDATA postgres >/dev/null
exec $bin/postgres -D $PGDATA -c listen_addresses='*' -c fsync=off -c unix_socket_directories=/tmp
"""
    sh("docker", "run", "-d", "--name", name, "--label", kubelet.label, "--network", kubelet.network,
       "--network-alias", "managed-db", "--user", "postgres", "-e", f"PGPASSWORD_INIT={password}",
       image, "sh", "-c", script)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        r = sh("docker", "exec", name, "sh", "-c",
               "$(ls -d /usr/lib/postgresql/*/bin | tail -1)/pg_isready -h 127.0.0.1 -U chat -d chat", check=False)
        if r.returncode == 0:
            return name
        time.sleep(0.3)
    raise RuntimeError("postgres did not start:\n" + sh("docker", "logs", name, check=False).stderr)


def test_redis_pod_runs_with_its_password(objects, cluster, k8s_timings):
    kubelet, start = cluster["kubelet"], time.monotonic()
    template = kube.pod_template(kube.find(objects, "Deployment", "chat-redis"))
    image = template["spec"]["containers"][0]["image"]
    redis_image(image)  # a local image carrying exactly the name:tag the manifest names
    service = kube.find(objects, "Service", "chat-redis")
    pod = kubelet.create_pod("chat-redis-0", template, aliases=[service["metadata"]["name"]])
    kubelet.start(pod, "redis", cluster["configmaps"], cluster["secrets"])
    kubelet.wait_started(pod, "redis")
    ready = kubelet.wait_ready(pod, "redis", timeout=30)
    assert ready.ok, ready
    assert kubelet.probe(pod, "redis", template["spec"]["containers"][0]["livenessProbe"]).ok
    container = pod.containers["redis"]
    # requirepass is the Secret's: without it Redis refuses, with it it answers.
    r = sh("docker", "exec", container, "redis-cli", "-h", "127.0.0.1", "ping", check=False)
    assert "NOAUTH" in r.stdout + r.stderr, r
    # The password is not visible in the process list.
    r = sh("docker", "exec", container, "sh", "-c", "tr '\\0' ' ' < /proc/1/cmdline", check=False)
    assert cluster["secrets"]["chat-secrets"]["REDIS_PASSWORD"] not in r.stdout, r.stdout
    r = sh("docker", "exec", container, "sh", "-c", "REDISCLI_AUTH=\"$REDIS_PASSWORD\" redis-cli -h 127.0.0.1 config get save", check=False)
    assert r.stdout.split("\n")[1:2] == [""], f"persistence is on: {r.stdout!r}"
    cluster["pods"]["redis"] = pod
    k8s_timings["redis pod"] = time.monotonic() - start


def web_pod(cluster, objects, index: int):
    template = kube.pod_template(kube.find(objects, "Deployment", "chat-web"))
    service = kube.find(objects, "Service", "chat-web")
    port = template["spec"]["containers"][0]["ports"][0]["containerPort"]
    return cluster["kubelet"].create_pod(f"chat-web-{index}", template, aliases=[service["metadata"]["name"]],
                                         publish=[port])


def test_migration_job_runs_before_the_web_pods_serve(objects, cluster, k8s_timings):
    assert "redis" in cluster["pods"], "the Redis pod did not start"
    kubelet, cms, sec = cluster["kubelet"], cluster["configmaps"], cluster["secrets"]
    start = time.monotonic()
    # A web pod created before the Job: its init container waits.
    web1 = web_pod(cluster, objects, 1)
    init = kubelet.start(web1, "wait-for-migrations", cms, sec)
    time.sleep(6)
    assert kubelet.running(init), f"the init container did not wait for migrations:\n{kubelet.logs(init)}"
    assert "waiting for the chat-migrate Job" in kubelet.logs(init)
    # The Job's pod, as declared (retries up to backoffLimit like the Job controller).
    job = kube.find(objects, "Job", "chat-migrate")
    template = kube.pod_template(job)
    code, attempts = None, 0
    while code != 0 and attempts <= job["spec"].get("backoffLimit", 6):
        pod = kubelet.create_pod(f"chat-migrate-{attempts}", template)
        code = kubelet.run_to_completion(pod, "migrate", cms, sec, timeout=job["spec"]["activeDeadlineSeconds"])
        attempts += 1
    assert code == 0, kubelet.logs(pod.containers["migrate"])
    assert "Applying" in kubelet.logs(pod.containers["migrate"])
    k8s_timings["migrate job"] = time.monotonic() - start
    # The waiting init container now finishes; the second pod's passes at once.
    assert kubelet.wait_exit(init, 30) == 0, kubelet.logs(init)
    web2 = web_pod(cluster, objects, 2)
    assert kubelet.run_to_completion(web2, "wait-for-migrations", cms, sec, timeout=60) == 0
    cluster["pods"]["web"] = [web1, web2]


def test_web_pods_start_and_pass_their_declared_probes(objects, cluster, k8s_timings):
    assert "web" in cluster["pods"], "the web pods were not initialised"
    kubelet, start = cluster["kubelet"], time.monotonic()
    for pod in cluster["pods"]["web"]:
        kubelet.start(pod, "web", cluster["configmaps"], cluster["secrets"])
    for pod in cluster["pods"]["web"]:
        took = kubelet.wait_started(pod, "web")
        spec = pod.spec("web")
        assert kubelet.probe(pod, "web", spec["livenessProbe"]).detail.startswith("HTTP 200")
        ready = kubelet.wait_ready(pod, "web", timeout=60)
        assert ready.detail.startswith("HTTP 200"), ready  # stricter than the kubelet's 200-399
        # The kubelet sends the pod IP as Host: the health paths answer it, any
        # other path refuses it (Django's host validation still holds there).
        assert "httpHeaders" not in spec["readinessProbe"]["httpGet"]
        page = {**spec["readinessProbe"], "httpGet": {**spec["readinessProbe"]["httpGet"], "path": "/accounts/login/"}}
        refused = kubelet.probe(pod, "web", page)
        assert not refused.ok and "HTTP 400" in refused.detail, refused
        k8s_timings[f"{pod.name} startup probe"] = took
    k8s_timings["web pods ready"] = time.monotonic() - start


def test_web_containers_carry_the_security_context(cluster):
    pods = cluster["pods"].get("web")
    assert pods, "the web pods did not start"
    name = pods[0].containers["web"]
    status = sh("docker", "exec", name, "cat", "/proc/1/status").stdout
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    assert fields["Uid"].split()[:2] == ["10001", "10001"], fields["Uid"]
    assert int(fields["CapEff"].strip(), 16) == 0 and int(fields["CapBnd"].strip(), 16) == 0
    assert fields["NoNewPrivs"].strip() == "1"
    assert fields["Seccomp"].strip() == "2", "not under a seccomp filter"
    r = sh("docker", "exec", name, "sh", "-c",
           "touch /app/x 2>/dev/null && echo app-writable; touch /x 2>/dev/null && echo root-writable; "
           "touch /tmp/ok && echo tmp-ok", check=False)
    assert r.stdout.split() == ["tmp-ok"], r.stdout + r.stderr
    env = sh("docker", "exec", name, "sh", "-c", "tr '\\0' '\\n' < /proc/1/environ").stdout
    assert "DEBUG=False" in env.splitlines()
    expected = f"REDIS_URL=redis://:{cluster['secrets']['chat-secrets']['REDIS_PASSWORD']}@chat-redis:6379/0"
    assert expected in env.splitlines(), "$(REDIS_PASSWORD) was not expanded as the kubelet does"
    cmdline = sh("docker", "exec", name, "sh", "-c", "tr '\\0' ' ' < /proc/1/cmdline").stdout.split()
    assert cmdline[-1].endswith("gunicorn") and len([a for a in cmdline if a.startswith("-")]) == 0, cmdline


def test_contract_across_both_replicas(objects, cluster, k8s_timings):
    pods = cluster["pods"].get("web")
    assert pods, "the web pods did not start"
    kubelet = cluster["kubelet"]
    config = kube.config_data(objects)
    port = int(config["PORT"])
    watches = [Watch(kubelet, pod, "web", act=True) for pod in pods]
    for w in watches:
        w.start()
    start = time.monotonic()
    try:
        urls = [f"http://127.0.0.1:{pod.published[port]}" for pod in pods]
        hosts = ",".join(f"docker://{pod.containers['web']}" for pod in pods)
        output = run_contract(urls[0], hosts, workers=int(config["WEB_CONCURRENCY"]), port=port, redis="chat-redis:6379",
                     host_header=cluster["public_host"], https_proxy=True, second_url=urls[1])
    finally:
        for w in watches:
            w.stop.set()
            w.join(10)
    k8s_timings["contract"] = time.monotonic() - start
    print("\n" + output.strip().splitlines()[-1])
    for w in watches:
        assert not w.events, f"{w.pod.name}: {w.events}"
        assert w.counts["livenessProbe"][0] >= 1 and w.counts["readinessProbe"][0] >= 1, w.counts


def test_a_redis_outage_neither_empties_the_service_nor_restarts_pods(objects, cluster, k8s_timings):
    """30 s of a frozen Redis pod with the probes acting as the kubelet acts:
    readiness (/startupz) and liveness (/healthz) keep passing, so both pods
    stay in the Service and nothing restarts. Control, in the same outage:
    the previous readinessProbe (/readyz) would have taken both pods out of
    the endpoints at once (nothing left behind the gateway)."""
    from tests.platforms.checkers import redis_outage

    pods = cluster["pods"].get("web")
    assert pods and "redis" in cluster["pods"], "the pods did not start"
    kubelet = cluster["kubelet"]
    shipped = [Watch(kubelet, pod, "web", act=True) for pod in pods]
    control = []
    for pod in pods:
        old = copy.deepcopy(pod.spec("web")["readinessProbe"])
        old["httpGet"]["path"] = "/readyz"
        control.append(Watch(kubelet, pod, "web", probes={"readinessProbe": old}, label=f"{pod.name} control: readiness on /readyz"))
    for w in (*shipped, *control):
        w.start()
    redis = cluster["pods"]["redis"].containers["redis"]
    try:
        time.sleep(6)
        start, end = redis_outage(lambda: sh("docker", "pause", redis), lambda: sh("docker", "unpause", redis))
        deadline = time.monotonic() + 30
        while not all(w.ready for w in control) and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        for w in (*shipped, *control):
            w.stop.set()
        for w in (*shipped, *control):
            w.join(15)
    report = "\n".join(w.describe(start) for w in (*shipped, *control))
    print(f"\nkubernetes, Redis pod frozen for {end - start:.0f} s:\n{report}")
    assert all(not w.events and w.restarts == 0 and w.counts["readinessProbe"][1] == 0 for w in shipped), report
    outs = [next((t for t, what in w.events if "out of the Service" in what), None) for w in control]
    assert all(t is not None for t in outs), "control: /readyz readiness did not empty the endpoints:\n" + report
    assert max(outs) < min(t for w in control for t, what in w.events if "ready again" in what), \
        "control: the pods were never out of the endpoints at the same time:\n" + report
    k8s_timings["outage: control endpoints empty after"] = max(outs) - start


def stored_ids(cluster, room: int) -> list[int]:
    """The database is the ground truth: every message stored in the room."""
    r = sh("docker", "exec", "-e", f"PGPASSWORD={cluster['pg_password']}", cluster["pg"], "sh", "-c",
           f"$(ls -d /usr/lib/postgresql/*/bin | tail -1)/psql -h 127.0.0.1 -U chat -d chat -tAc "
           f"'select id from chat_message where room_id = {int(room)} order by id'")
    return [int(x) for x in r.stdout.split()]


def test_rolling_update_keeps_clients_and_delivers_every_message_once(objects, cluster, k8s_timings):
    """A rolling update of chat-web as the Deployment controller and the
    kubelet run it (maxSurge 1, maxUnavailable 0): a new pod starts (init
    container, startup and readiness probes, minReadySeconds) and joins the
    Service; then an old pod leaves the endpoints and gets preStop, SIGTERM;
    the next new pod starts meanwhile. Clients connected through the Service
    reconnect (close 1012) with `?after=` and every message the database holds
    for the room arrives at each client exactly once."""
    from tests.contract.verify import Endpoint
    from tests.harness import chat_client
    from tests.harness.rolling import Follower, Rotation, Sender, delivery

    old_pods = cluster["pods"].get("web")
    assert old_pods and len(old_pods) == 2, "the web pods did not start"
    kubelet, cms, sec = cluster["kubelet"], cluster["configmaps"], cluster["secrets"]
    deployment = kube.find(objects, "Deployment", "chat-web")
    min_ready = deployment["spec"].get("minReadySeconds", 0)
    port = int(kube.config_data(objects)["PORT"])

    def endpoint(pod):
        return Endpoint(f"http://127.0.0.1:{pod.published[port]}", cluster["public_host"], https_proxy=True, insecure=False)

    service = Rotation({pod.name: endpoint(pod) for pod in old_pods})
    owner = chat_client.new_user(service.pick())
    room = chat_client.create_room(owner)
    path = f"/ws/rooms/{room}/"
    stop, sending = threading.Event(), threading.Event()
    followers = [Follower(f"client{i}", service.pick, chat_client.new_user(service.pick()), path, stop) for i in range(3)]
    sender = Sender(service.all, owner, path, sending, interval=0.25)
    for thread in (*followers, sender):
        thread.start()
    start = time.monotonic()
    terminations, new_pods, results = [], [], {}
    try:
        time.sleep(2)
        for i, old in enumerate(old_pods):
            new = web_pod(cluster, objects, 10 + i)
            assert kubelet.run_to_completion(new, "wait-for-migrations", cms, sec, timeout=60) == 0
            kubelet.start(new, "web", cms, sec)
            kubelet.wait_started(new, "web")
            kubelet.wait_ready(new, "web", timeout=60)
            time.sleep(min_ready)                 # available only after minReadySeconds
            service.add(new.name, endpoint(new))
            new_pods.append(new)
            # The old ReplicaSet is scaled down by one: the pod leaves the
            # endpoints at once, the kubelet runs preStop, then SIGTERM.
            service.remove(old.name)
            t = threading.Thread(target=lambda o=old: results.__setitem__(o.name, kubelet.terminate(o, "web")), daemon=True)
            t.start()
            terminations.append(t)
        for t in terminations:
            t.join(120)
        time.sleep(2)
    finally:
        sending.set()
        sender.join(15)
    try:
        took = time.monotonic() - start
        stored = stored_ids(cluster, room)
        report = delivery(followers, stored)
        details = "\n".join(f.report() for f in followers) + f"\nrotation: {service.log}\nterminations: {results}"
        assert len(sender.confirmed) >= 20, f"only {len(sender.confirmed)} messages sent ({sender.failures} failures)\n{details}"
        assert len(stored) >= len(sender.confirmed), (len(stored), len(sender.confirmed))
        assert not any(r["missing"] or r["duplicated"] for r in report.values()), f"{report}\n{details}"
        for name, (code, secs, killed) in results.items():
            assert code == 0 and not killed, f"{name}: exit {code}, killed {killed} after {secs:.1f}s"
        for f in followers:
            assert f.connects >= 2, f"{f.name} was never moved by the rollout:\n{details}"
    finally:
        stop.set()
        for f in followers:
            f.join(5)
    cluster["pods"]["web"] = new_pods
    k8s_timings["rolling update"] = took
    print(f"\nrolling update: {len(stored)} messages stored, {len(followers)} clients each got all of them once; "
          f"reconnects {[f.connects - 1 for f in followers]}; {took:.0f} s")


def test_termination_drains_within_the_grace_period(cluster, k8s_timings):
    """preStop, SIGTERM, and a request stuck on the pod: Uvicorn cancels it
    (15 s after SIGTERM), gunicorn exits 0, all inside the grace period."""
    from tests.platforms.stuck import open_stuck_request, still_open

    pods = cluster["pods"].get("web")
    assert pods, "the web pods did not start"
    kubelet, pod = cluster["kubelet"], pods[-1]
    port = pod.spec("web")["ports"][0]["containerPort"]
    sock = open_stuck_request("127.0.0.1", pod.published[port])
    try:
        assert still_open(sock)
        code, took, killed = kubelet.terminate(pod, "web")
    finally:
        sock.close()
    grace = pod.template["spec"]["terminationGracePeriodSeconds"]
    logs = kubelet.logs(pod.containers["web"])
    assert not killed, f"gunicorn outlived the {grace}s grace period and was killed:\n{logs}"
    assert code == 0, f"exit {code}:\n{logs}"
    assert "timeout graceful shutdown exceeded" in logs, logs[-3000:]
    assert took < grace
    k8s_timings["termination with a stuck request"] = took
