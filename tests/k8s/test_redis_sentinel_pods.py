"""components/redis-sentinel run as a kubelet would (tests/k8s/kubelet.py),
with a failover while two users chat through two web pods.

The three StatefulSet pods get the DNS names a headless Service gives them
(`chat-redis-N.chat-redis-nodes`) as Docker network aliases: on a cluster
CoreDNS answers them (and the namespace's search domain completes them); here
Docker's DNS does. Their containers run the rendered commands unmodified,
with the Secret's values in their environment. What the emulation does not
do by itself, the test does as the kubelet would: restart a killed container
(`docker start`, which reruns its command, as restartPolicy Always does).
"""
from __future__ import annotations

import secrets
import threading
import time

import pytest

from tests.harness.debian_image import python_base_image, services_image
from tests.k8s import kube
from tests.k8s.images import redis_image
from tests.k8s.kubelet import Kubelet, sh, unique_prefix
from tests.k8s.test_pods import BASE_IMAGE, app_image, postgres, stored_ids  # noqa: F401  (app_image: fixture)

pytestmark = pytest.mark.docker

COMPONENT = kube.K8S / "components" / "redis-sentinel"
PASSWORDS = ("REDIS_PASSWORD", "REDIS_SENTINEL_PASSWORD")


@pytest.fixture(scope="module")
def objects(app_image) -> list[dict]:  # noqa: F811
    name, _, tag = app_image.rpartition(":")
    return kube.overlay({"images": [{"name": BASE_IMAGE, "newName": name, "newTag": tag}],
                         "components": [kube.relative_to_overlay(COMPONENT)]})


@pytest.fixture(scope="module")
def cluster(objects, k8s_timings):
    prefix = unique_prefix()
    network = f"{prefix}-net"
    sh("docker", "network", "create", "--label", f"chat-k8s-test={prefix}", network)
    kubelet = Kubelet(prefix, network, python_base_image())
    try:
        pg_password = secrets.token_hex(16)
        pg = postgres(kubelet, services_image(), pg_password)
        secret = {"SECRET_KEY": secrets.token_urlsafe(50), "DATABASE_URL": f"postgres://chat:{pg_password}@managed-db:5432/chat",
                  "REDIS_PASSWORD": secrets.token_hex(24), "REDIS_SENTINEL_PASSWORD": secrets.token_hex(24)}
        configmaps = {o["metadata"]["name"]: o["data"] for o in objects if o["kind"] == "ConfigMap"}
        yield {"kubelet": kubelet, "secrets": {"chat-secrets": secret}, "configmaps": configmaps, "pg": pg,
               "pg_password": pg_password, "public_host": kube.config_data(objects)["ALLOWED_HOSTS"].split(",")[0].strip(),
               "pods": {}}
    finally:
        kubelet.cleanup()
        sh("docker", "network", "rm", network, check=False)


def cli(cluster, pod, container: str, *args: str, port: int = 6379) -> str:
    password = cluster["secrets"]["chat-secrets"]["REDIS_PASSWORD" if port == 6379 else "REDIS_SENTINEL_PASSWORD"]
    r = sh("docker", "exec", "-e", f"REDISCLI_AUTH={password}", pod.containers[container], "redis-cli", "--no-auth-warning",
           "-h", "127.0.0.1", "-p", str(port), *args, check=False)
    return r.stdout.strip()


def primary_name(cluster, via) -> str:
    out = cli(cluster, via, "sentinel", "SENTINEL", "get-master-addr-by-name", "chat", port=26379)
    return out.split("\n")[0] if out else ""


def test_statefulset_pods_start_a_primary_two_replicas_and_three_sentinels(objects, cluster, k8s_timings):
    kubelet, cms, sec = cluster["kubelet"], cluster["configmaps"], cluster["secrets"]
    sts = kube.find(objects, "StatefulSet", "chat-redis")
    template, service = kube.pod_template(sts), sts["spec"]["serviceName"]
    redis_image(template["spec"]["containers"][0]["image"])
    start = time.monotonic()
    pods = []
    for i in range(sts["spec"]["replicas"]):  # podManagementPolicy: Parallel
        name = f"{sts['metadata']['name']}-{i}"
        pods.append(kubelet.create_pod(name, template, aliases=[f"{name}.{service}"]))
    for pod in pods:
        for container in ("redis", "sentinel"):
            kubelet.start(pod, container, cms, sec)
    for pod in pods:
        for container in ("redis", "sentinel"):
            kubelet.wait_started(pod, container)
            ready = kubelet.wait_ready(pod, container, timeout=60)
            assert ready.ok, (pod.name, container, ready, kubelet.logs(pod.containers[container]))
    cluster["pods"]["redis"] = pods
    deadline = time.monotonic() + 60
    while True:
        state = cli(cluster, pods[2], "sentinel", "SENTINEL", "master", "chat", port=26379).split("\n")
        fields = dict(zip(state[::2], state[1::2]))
        if fields.get("num-slaves") == "2" and fields.get("num-other-sentinels") == "2":
            break
        assert time.monotonic() < deadline, fields
        time.sleep(1)
    assert primary_name(cluster, pods[1]) == f"chat-redis-0.{service}"
    assert "role:slave" in cli(cluster, pods[1], "redis", "INFO", "replication")
    # Passwords: refused without, and never on a command line.
    r = sh("docker", "exec", pods[0].containers["sentinel"], "redis-cli", "-p", "26379", "ping", check=False)
    assert "NOAUTH" in r.stdout + r.stderr, r
    for pod in pods:
        for container in ("redis", "sentinel"):
            cmdline = sh("docker", "exec", pod.containers[container], "sh", "-c", "tr '\\0' ' ' < /proc/1/cmdline").stdout
            assert not any(sec["chat-secrets"][k] in cmdline for k in PASSWORDS), cmdline
    k8s_timings["sentinel pods ready"] = time.monotonic() - start


def web_pod(cluster, objects, index: int):
    template = kube.pod_template(kube.find(objects, "Deployment", "chat-web"))
    port = template["spec"]["containers"][0]["ports"][0]["containerPort"]
    return cluster["kubelet"].create_pod(f"chat-web-s{index}", template, aliases=["chat-web"], publish=[port])


def test_web_pods_run_on_the_sentinels(objects, cluster, k8s_timings):
    assert "redis" in cluster["pods"], "the Redis pods did not start"
    kubelet, cms, sec = cluster["kubelet"], cluster["configmaps"], cluster["secrets"]
    job = kube.pod_template(kube.find(objects, "Job", "chat-migrate"))
    migrate = kubelet.create_pod("chat-migrate-s", job)
    assert kubelet.run_to_completion(migrate, "migrate", cms, sec, timeout=300) == 0, kubelet.logs(migrate.containers["migrate"])
    pods = []
    for i in (1, 2):
        pod = web_pod(cluster, objects, i)
        assert kubelet.run_to_completion(pod, "wait-for-migrations", cms, sec, timeout=120) == 0
        kubelet.start(pod, "web", cms, sec)
        pods.append(pod)
    for pod in pods:
        kubelet.wait_started(pod, "web")
        ready = kubelet.wait_ready(pod, "web", timeout=60)
        assert ready.detail.startswith("HTTP 200"), ready
        env = pod.env["web"]
        assert "REDIS_URL" not in env and env["REDIS_SENTINELS"].count(".chat-redis-nodes:26379") == 3
    cluster["pods"]["web"] = pods


def test_failover_while_two_users_chat_through_two_web_pods(objects, cluster, k8s_timings):
    from tests.contract.verify import Endpoint
    from tests.harness import chat_client
    from tests.harness.rolling import Follower, Sender, delivery

    webs, nodes = cluster["pods"].get("web"), cluster["pods"].get("redis")
    assert webs and nodes, "the pods did not start"
    port = int(kube.config_data(objects)["PORT"])
    one, two = (Endpoint(f"http://127.0.0.1:{pod.published[port]}", cluster["public_host"], https_proxy=True, insecure=False)
                for pod in webs)
    owner = chat_client.new_user(one)
    room = chat_client.create_room(owner)
    path = f"/ws/rooms/{room}/"
    stop, sending = threading.Event(), threading.Event()
    followers = [Follower("via-web-1", one, chat_client.new_user(one), path, stop),
                 Follower("via-web-2", two, chat_client.new_user(two), path, stop)]
    sender = Sender([one, two], owner, path, sending, interval=0.25)
    for thread in (*followers, sender):
        thread.start()
    old = next(p for p in nodes if primary_name(cluster, nodes[2]).startswith(p.name + "."))
    try:
        time.sleep(3)
        before = len(sender.confirmed)
        t_kill = time.monotonic()
        sh("docker", "kill", "--signal", "KILL", old.containers["redis"])  # the primary's server dies
        deadline = time.monotonic() + 60
        witness = next(p for p in nodes if p is not old)
        while (now := primary_name(cluster, witness)) in ("", f"{old.name}.chat-redis-nodes"):
            assert time.monotonic() < deadline, "the sentinels did not promote a replica"
            time.sleep(0.2)
        promoted = time.monotonic() - t_kill
        time.sleep(6)
        # restartPolicy Always: the kubelet starts the container again; its
        # command asks the sentinels and rejoins as a replica of the new primary.
        sh("docker", "start", old.containers["redis"])
        deadline = time.monotonic() + 60
        while "role:slave" not in cli(cluster, old, "redis", "INFO", "replication"):
            assert time.monotonic() < deadline, kubelet_logs(cluster, old)
            time.sleep(0.5)
        rejoined = time.monotonic() - t_kill
        time.sleep(2)
    finally:
        sending.set()
        sender.join(15)
    try:
        stored = stored_ids(cluster, room)
        report = delivery(followers, stored)
        details = "\n".join(f.report() for f in followers)
        assert len(sender.confirmed) - before >= 20, f"only {len(sender.confirmed) - before} messages after the kill\n{details}"
        assert not any(r["missing"] or r["duplicated"] for r in report.values()), f"{report}\n{details}"
    finally:
        stop.set()
        for f in followers:
            f.join(5)
    k8s_timings["sentinel failover: promoted"] = promoted
    k8s_timings["sentinel failover: old primary a replica"] = rejoined
    print(f"\nkubernetes Sentinel failover: {old.name}'s Redis SIGKILLed, {now} promoted {promoted:.1f} s later; "
          f"{len(stored)} messages stored, each on both users' sockets once (web pods "
          f"{[f.connects for f in followers]} connects); the killed server a replica again {rejoined:.1f} s after the kill")


def kubelet_logs(cluster, pod) -> str:
    return "\n".join(cluster["kubelet"].logs(c) for c in pod.containers.values())
