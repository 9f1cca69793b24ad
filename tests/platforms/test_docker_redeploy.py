"""A redeploy on a plain Docker host, with clients connected: two containers
of the image share Redis behind a balancer (a `Rotation`: the instances new
connections go to); one is replaced the way deploy/docker.md does it: start
the new container, wait for /readyz, put it in rotation, take the old one out,
`docker stop` it (SIGTERM; `--stop-timeout 30` before SIGKILL). Clients on the
old container get close 1012, reconnect with `?after=` through the balancer,
and every message the database holds for the room arrives at every client
exactly once (the shared client of tests/harness/rolling.py)."""
from __future__ import annotations

import re
import threading
import time

import pytest

from tests.contract.verify import Endpoint
from tests.harness import chat_client
from tests.harness.rolling import Follower, Rotation, Sender, delivery
from tests.platforms import windows
from tests.platforms.infra import new_secret_key, out, sh

PUBLIC_HOST = "chat.example.test"


@pytest.fixture(scope="module")
def deployment(lab, app_image, svc_image):
    pg = lab.postgres("rd-pg", svc_image, aliases=["rd-db"], databases=["chat"])
    redis = lab.redis("rd-redis", svc_image, aliases=["rd-kv"])
    env = {"SECRET_KEY": new_secret_key(), "ALLOWED_HOSTS": PUBLIC_HOST, "DATABASE_URL": pg.postgres_url("chat"),
           "REDIS_URL": redis.redis_url()}
    migrate = lab.run_once("rd-migrate", app_image, ["python", "manage.py", "migrate", "--noinput"], env=env)
    assert migrate.returncode == 0, out(migrate)
    return {"pg": pg, "env": env, "image": app_image}


def start(lab, deployment, role: str) -> tuple[str, Endpoint]:
    name = lab.run(role, deployment["image"], env=deployment["env"], read_only=True, tmpfs=["/tmp"], publish=[8000])
    port = lab.port(name, 8000)
    lab.wait_http(name, port, "/readyz", PUBLIC_HOST)   # the deploy gate: database and Redis reachable
    return name, Endpoint(f"http://127.0.0.1:{port}", PUBLIC_HOST, https_proxy=True, insecure=False)


def stored_ids(lab, deployment, room: int) -> list[int]:
    pg = deployment["pg"]
    r = sh("docker", "exec", "-e", f"PGPASSWORD={pg.password}", pg.name, "sh", "-c",
           "$(ls -d /usr/lib/postgresql/*/bin | tail -1)/psql -h 127.0.0.1 -U chat -d chat -tAc "
           f"'select id from chat_message where room_id = {int(room)} order by id'")
    return [int(x) for x in out(r).split() if re.fullmatch(r"\d+", x)]


def test_replacing_a_container_keeps_clients_and_delivers_every_message_once(lab, deployment, timings):
    old, old_ep = start(lab, deployment, "rd-web1")
    other, other_ep = start(lab, deployment, "rd-web2")
    balancer = Rotation({old: old_ep, other: other_ep})
    owner = chat_client.new_user(old_ep)
    room = chat_client.create_room(owner)
    path = f"/ws/rooms/{room}/"
    stop, sending = threading.Event(), threading.Event()
    followers = [Follower(f"client{i}", balancer.pick, chat_client.new_user(balancer.pick()), path, stop) for i in range(4)]
    # Two of them surely start on the container that is replaced.
    followers[0].endpoint = followers[1].endpoint = old_ep
    sender = Sender(balancer.all, owner, path, sending, interval=0.25)
    for thread in (*followers, sender):
        thread.start()
    stop_after = windows.docker().kill_after
    try:
        time.sleep(2)
        new, new_ep = start(lab, deployment, "rd-web3")
        balancer.add(new, new_ep)
        balancer.remove(old)
        for f in followers[:2]:
            f.endpoint = balancer.pick      # their next connection goes through the balancer
        begin = time.monotonic()
        sh("docker", "stop", "-t", str(int(stop_after)), old, timeout=stop_after + 30)
        stopped_in = time.monotonic() - begin
        code = sh("docker", "inspect", "-f", "{{.State.ExitCode}}", old).stdout.decode().strip()
        time.sleep(3)
    finally:
        sending.set()
        sender.join(15)
    try:
        stored = stored_ids(lab, deployment, room)
        report = delivery(followers, stored)
        details = "\n".join(f.report() for f in followers) + f"\nrotation: {balancer.log}"
        assert code == "0", f"the old container exited {code} (137 = killed):\n{lab.logs(old)[-3000:]}"
        assert len(sender.confirmed) >= 20 and len(stored) >= len(sender.confirmed), (len(sender.confirmed), len(stored))
        assert not any(r["missing"] or r["duplicated"] for r in report.values()), f"{report}\n{details}"
        assert all(f.connects >= 2 for f in followers[:2]), f"the old container's clients never reconnected:\n{details}"
    finally:
        stop.set()
        for f in followers:
            f.join(5)
    timings["docker redeploy: old container stopped in"] = stopped_in
    print(f"\ndocker redeploy: {len(stored)} messages stored, each of {len(followers)} clients got every one once; "
          f"old container stopped in {stopped_in:.1f} s (exit {code})")
