"""deploy/ansible's Redis Sentinel layout on the three-host lab (issue 14).

After every test of the default (single Redis) layout, one more playbook run
switches the same lab: the inventory gains a `redis_sentinel` group (web1,
web2, data) and web1 joins `redis`, so data keeps the primary, web1 gets a
replica and each host a sentinel; the app gets REDIS_SENTINELS instead of
REDIS_URL. Then: sentinels and replicas listen
on loopback and the private address only, with passwords; and the primary's
Redis on data is SIGKILLed (and kept down) while two users on different web
hosts chat: the sentinels promote web1's replica and the chat goes on across
hosts, every stored message arriving once on both. Last, a playbook run
after the failover changes nothing and keeps the new topology.
"""
from __future__ import annotations

import secrets
import threading
import time

import pytest

from tests.harness import chat_client
from tests.harness.rolling import Follower, Sender, delivery
from tests.vm.conftest import TIMINGS, host_logs
from tests.vm.test_ansible_deploy import endpoint

pytestmark = pytest.mark.docker

MASTER = "chat"


def redis_cli(host, password: str, *args: str, port: int = 6379, address: str = "127.0.0.1") -> str:
    cmd = " ".join(["redis-cli", "-h", address, "-p", str(port), "--no-auth-warning", *args])
    return host.sh(f"REDISCLI_AUTH='{password}' {cmd}", check=False).stdout.strip()


def sentinel_primary(lab, via: str = "web2") -> str:
    out = redis_cli(lab.hosts[via], lab.secrets["CHAT_REDIS_SENTINEL_PASSWORD"], "SENTINEL", "get-master-addr-by-name",
                    MASTER, port=26379)
    return out.split()[0] if out else ""


@pytest.fixture(scope="module")
def sentinel_layout(lab, source, deployed):
    lab.secrets["CHAT_REDIS_SENTINEL_PASSWORD"] = secrets.token_urlsafe(24)
    lab.hosts["web1"].groups += ["redis", "redis_sentinel"]
    lab.hosts["web2"].groups += ["redis_sentinel"]
    lab.hosts["data"].groups += ["redis_sentinel"]
    lab.write_inventory()
    run = lab.playbook(source)
    TIMINGS["switch to Sentinel"] = run.seconds
    assert run.returncode == 0, f"ansible-playbook failed:\n{run.output[-8000:]}\n{host_logs(lab)}"
    return run


def test_switch_to_sentinel_layout(lab, sentinel_layout):
    for name in ("web1", "web2"):
        env = lab.hosts[name].sh("cat /etc/chat/chat.env").stdout
        assert "REDIS_SENTINELS=" in env and "REDIS_URL=" not in env, env.replace(lab.secrets["CHAT_REDIS_PASSWORD"], "***")
    data, web1 = lab.hosts["data"], lab.hosts["web1"]
    deadline = time.monotonic() + 60
    while True:
        replication = redis_cli(web1, lab.secrets["CHAT_REDIS_PASSWORD"], "INFO", "replication")
        state = redis_cli(data, lab.secrets["CHAT_REDIS_SENTINEL_PASSWORD"], "SENTINEL", "master", MASTER, port=26379)
        fields = dict(zip(state.split("\n")[::2], state.split("\n")[1::2]))
        if ("master_link_status:up" in replication and fields.get("num-slaves") == "1"
                and fields.get("num-other-sentinels") == "2"):
            break
        assert time.monotonic() < deadline, f"replica/sentinels not ready:\n{replication}\n{fields}"
        time.sleep(1)
    assert sentinel_primary(lab) == data.address


def listening(host, port: int) -> set[str]:
    out = host.sh("ss -Hltn").stdout
    return {line.split()[3].rsplit(":", 1)[0] for line in out.splitlines() if line.split()[3].endswith(f":{port}")}


def test_sentinels_and_replicas_are_private_and_need_passwords(lab, sentinel_layout):
    web1, web2, data = lab.hosts["web1"], lab.hosts["web2"], lab.hosts["data"]
    for host in (web1, web2, data):
        assert listening(host, 26379) == {"127.0.0.1", host.address}, (host.name, listening(host, 26379))
    for host in (web1, data):
        assert listening(host, 6379) == {"127.0.0.1", host.address}, (host.name, listening(host, 6379))
    assert listening(web2, 6379) == set()  # no Redis server on web2
    probe = "timeout 5 bash -c 'exec 3<>/dev/tcp/%s/%d; printf \"%s\" >&3; head -c %d <&3'"
    for target, port in ((web1, 6379), (data, 26379)):
        noauth = web2.sh(probe % (target.address, port, "PING\\r\\n", 7), check=False).stdout
        assert noauth.startswith("-NOAUTH"), (target.name, port, noauth)
    # Positive control: with the password, the sentinel answers from another host.
    password = lab.secrets["CHAT_REDIS_SENTINEL_PASSWORD"]
    pong = web2.sh(probe % (data.address, 26379, f"AUTH {password}\\r\\nPING\\r\\n", 12), check=False).stdout
    assert pong.split() == ["+OK", "+PONG"], pong


def test_chat_continues_across_hosts_when_the_primary_dies(lab, sentinel_layout):
    data, web1 = lab.hosts["data"], lab.hosts["web1"]
    assert sentinel_primary(lab) == data.address, "data is not the primary: run the layout switch first"
    one, two = endpoint(lab, "web1"), endpoint(lab, "web2")
    owner = chat_client.new_user(one)
    room = chat_client.create_room(owner)
    path = f"/ws/rooms/{room}/"
    stop, sending = threading.Event(), threading.Event()
    followers = [Follower("via-web1", one, chat_client.new_user(one), path, stop),
                 Follower("via-web2", two, chat_client.new_user(two), path, stop)]
    sender = Sender([one, two], owner, path, sending)
    seen_at: dict[str, dict[int, float]] = {f.name: {} for f in followers}

    def watch():
        while not stop.is_set():
            now = time.monotonic()
            for f in followers:
                for mid in list(f.ids):
                    seen_at[f.name].setdefault(mid, now)
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    for thread in (*followers, sender, watcher):
        thread.start()
    try:
        time.sleep(3)
        before = len(sender.confirmed)
        t_kill = time.monotonic()
        # SIGKILL, and keep it down (systemd would restart it): a host's Redis lost.
        data.sh("systemctl kill --signal=SIGKILL redis-server; systemctl stop redis-server")
        deadline = time.monotonic() + 60
        while (primary := sentinel_primary(lab)) in ("", data.address):
            assert time.monotonic() < deadline, "the sentinels did not promote web1's replica"
            time.sleep(0.2)
        promoted_s = time.monotonic() - t_kill
        assert primary == web1.address, primary
        time.sleep(8)
    finally:
        sending.set()
        sender.join(15)
    try:
        stored = [int(i) for i in data.sh(
            f"runuser -u postgres -- psql -d chat -tAc 'SELECT id FROM chat_message WHERE room_id = {room}'").stdout.split()]
        report = delivery(followers, stored)
        after_kill = [mid for mid in stored if all(mid in seen_at[f.name] for f in followers)
                      and min(seen_at[f.name][mid] for f in followers) > t_kill]
        # Back to normal when a message reaches both hosts' users within 2 s of the kill-time backlog clearing.
        recovered_s = max((max(seen_at[f.name][mid] for f in followers) - t_kill for mid in after_kill
                           if min(seen_at[f.name][mid] for f in followers) < t_kill + promoted_s + 1), default=None)
        assert len(sender.confirmed) - before >= 10, f"only {len(sender.confirmed) - before} messages after the kill"
        assert not any(r["missing"] for r in report.values()), (report, [f.report() for f in followers], host_logs(lab))
        assert not any(r["duplicated"] for r in report.values()), report
        # The old primary comes back as a replica of the new one.
        data.sh("systemctl start redis-server")
        deadline = time.monotonic() + 60
        while "role:slave" not in redis_cli(data, lab.secrets["CHAT_REDIS_PASSWORD"], "INFO", "replication"):
            assert time.monotonic() < deadline, "the old primary did not become a replica"
            time.sleep(1)
        TIMINGS["Sentinel failover: promoted"] = promoted_s
        TIMINGS["Sentinel failover: backlog on both hosts"] = recovered_s or 0.0
        print(f"\nSentinel failover on the VMs: replica promoted {promoted_s:.1f} s after the kill; "
              f"{len(stored)} messages stored, {len(after_kill)} after the kill, all on both hosts' users, none twice; "
              f"messages of the outage on both {recovered_s} s after the kill; follower reconnects "
              f"{[f.connects for f in followers]}")
    finally:
        stop.set()
        for thread in (*followers, watcher):
            thread.join(5)


def test_a_run_after_the_failover_changes_nothing(lab, source, sentinel_layout):
    """After the failover web1 is the primary and data its replica: the next
    playbook run changes nothing and leaves that topology alone (the servers'
    config files are read-only for Sentinel's CONFIG REWRITE, the replica
    bootstrap runs only while no sentinel names a primary, the sentinels'
    own files are never rewritten by the role)."""
    web1, data = lab.hosts["web1"], lab.hosts["data"]
    primary = sentinel_primary(lab)
    assert primary == web1.address, f"run after test_chat_continues_across_hosts_when_the_primary_dies: primary {primary}"
    run = lab.playbook(source)
    TIMINGS["Sentinel second run"] = run.seconds
    assert run.returncode == 0, run.output[-8000:]
    changed = {host: r["changed"] for host, r in run.recap.items()}
    assert not any(changed.values()), f"the run changed something: {changed}\n" + "\n".join(run.changed_tasks())
    assert sentinel_primary(lab) == web1.address
    assert "role:slave" in redis_cli(data, lab.secrets["CHAT_REDIS_PASSWORD"], "INFO", "replication")
    assert "connected_slaves:1" in redis_cli(web1, lab.secrets["CHAT_REDIS_PASSWORD"], "INFO", "replication")
