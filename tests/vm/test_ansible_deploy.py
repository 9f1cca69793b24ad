"""deploy/ansible proven over SSH against three systemd hosts (issue [C]).

web1 (Debian 12) and web2 (Debian 13) run nginx + the app, data (Debian 12)
runs PostgreSQL and Redis. The real `ansible-playbook` deploys twice (the
second run must change nothing), then the deployment contract runs on each web
host through testinfra's ansible backend and through each host's nginx, with
the second user of the black-box checker on the other web host (a message
crosses hosts through Redis). Last, a new release rolls out while websocket
clients stay connected.
"""
from __future__ import annotations

import json
import sys
import threading
import time
import traceback

import pytest

from tests.contract.verify import Endpoint
from tests.harness import chat_client
from tests.harness.contract import run_contract
from tests.vm.conftest import TIMINGS, host_logs, ssh
from tests.vm.lab import DOMAIN
from tests.vm.rolling import Follower, Prober, Sender

pytestmark = pytest.mark.docker



def stacks() -> str:
    """Every thread's stack: what a stuck client thread is waiting for."""
    names = {t.ident: t.name for t in threading.enumerate()}
    return "\n".join(f"--- {names.get(ident, ident)}\n{''.join(traceback.format_stack(frame))}"
                     for ident, frame in sys._current_frames().items())


def endpoint(lab, name) -> Endpoint:
    return Endpoint(lab.hosts[name].https_url, DOMAIN, https_proxy=False, insecure=True)


def test_first_deploy_changes_every_host(deployed):
    assert all(r["changed"] > 0 for r in deployed.recap.values()), deployed.recap


def test_second_run_changes_nothing(lab, source, deployed):
    run = lab.playbook(source)
    TIMINGS["second run"] = run.seconds
    assert run.returncode == 0, run.output[-8000:]
    changed = {host: r["changed"] for host, r in run.recap.items()}
    assert set(changed) == {"web1", "web2", "data"} and not any(changed.values()), (
        f"second run changed something: {changed}\n" + "\n".join(run.changed_tasks())
    )


@pytest.mark.parametrize("name,other", [("web1", "web2"), ("web2", "web1")])
def test_contract_on_each_web_host(lab, deployed, name, other):
    """testinfra over SSH (ansible inventory) + the black-box checker through
    this host's nginx, its second user connected through the other host."""
    start = time.monotonic()
    try:
        run_contract(
            lab.hosts[name].https_url,
            f"ansible://{name}?ansible_inventory={lab.inventory}",
            workers=2,
            port=8000,
            redis=f"{lab.hosts['data'].address}:6379",
            host_header=DOMAIN,
            https_proxy=False,
            insecure=True,
            second_url=lab.hosts[other].https_url,
            http_url=lab.hosts[name].http_url,
            env=lab.environment(),
        )
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{host_logs(lab)}") from None
    TIMINGS[f"contract {name}"] = time.monotonic() - start


def test_cross_host_message_through_both_nginx(lab, deployed):
    """Explicitly: posted through web1's nginx, received through web2's."""
    one, two = endpoint(lab, "web1"), endpoint(lab, "web2")
    alice, bob = chat_client.new_user(one), chat_client.new_user(two)
    room = chat_client.create_room(alice)
    path = f"/ws/rooms/{room}/"
    with one.websocket(path, alice.cookies) as ws1, two.websocket(path, bob.cookies) as ws2:
        chat_client.send(ws1, "web1 to web2")
        chat_client.wait_for_text(ws2, "web1 to web2")
        chat_client.send(ws2, "web2 to web1")
        chat_client.wait_for_text(ws1, "web2 to web1")


def test_nginx_serves_static_files_itself(lab, deployed):
    manifest = lab.hosts["web1"].sh("cat /srv/chat/current/staticfiles/staticfiles.json").stdout
    name = next(iter(json.loads(manifest)["paths"].values()))
    with endpoint(lab, "web1").client() as client:
        r = client.get(f"/static/{name}", headers={"Host": DOMAIN})
    assert r.status_code == 200, r.status_code
    assert r.headers.get("server", "").startswith("nginx"), r.headers  # whitenoise would say uvicorn
    with endpoint(lab, "web1").client() as client:
        plain = client.get(f"http://127.0.0.1:{lab.hosts['web1'].ports[80]}/accounts/login/", headers={"Host": DOMAIN})
    assert plain.status_code == 301 and plain.headers["location"] == f"https://{DOMAIN}/accounts/login/", plain.headers


def test_data_services_stay_private(lab, deployed):
    data, web1 = lab.hosts["data"], lab.hosts["web1"]
    listening = data.sh("ss -Hltn").stdout
    for port in (6379, 5432):
        binds = {line.split()[3].rsplit(":", 1)[0] for line in listening.splitlines() if line.split()[3].endswith(f":{port}")}
        assert binds == {"127.0.0.1", data.address}, f"port {port} listens on {binds}"
    probe = "timeout 5 bash -c 'exec 3<>/dev/tcp/%s/6379; printf \"%s\" >&3; head -c %d <&3'"
    # From a web host on the private network: Redis answers, but only after AUTH.
    noauth = web1.sh(probe % (data.address, "PING\\r\\n", 7), check=False).stdout
    assert noauth.startswith("-NOAUTH"), noauth
    password = lab.secrets["CHAT_REDIS_PASSWORD"]
    pong = web1.sh(probe % (data.address, f"AUTH {password}\\r\\nPING\\r\\n", 12), check=False).stdout
    assert pong.split() == ["+OK", "+PONG"], pong
    # PostgreSQL: scram-sha-256 only.
    sql = "runuser -u postgres -- psql -tAc \"%s\""
    assert data.sh(sql % "SHOW password_encryption").stdout.strip() == "scram-sha-256"
    stored = data.sh(sql % "SELECT rolpassword FROM pg_authid WHERE rolname = 'chat'").stdout.strip()
    assert stored.startswith("SCRAM-SHA-256$"), stored[:20]
    hba = data.sh(sql % "SELECT DISTINCT auth_method FROM pg_hba_file_rules WHERE type <> 'local'").stdout.split()
    assert hba == ["scram-sha-256"], hba


def cgroup2_mount(host) -> str | None:
    """Where the host's cgroup v2 hierarchy is mounted: /sys/fs/cgroup (unified
    mode) or /sys/fs/cgroup/unified (systemd's hybrid mode, as on these lab
    hosts, whose kernel runs cgroup v1 for the controllers). systemd attaches
    its IPAddressDeny BPF programs there; in either mode they are enforced."""
    mounts = host.sh("awk '$3 == \"cgroup2\" {print $2}' /proc/self/mounts").stdout.split()
    return mounts[0] if mounts else None


def reachable(source, address: str, port: int) -> bool:
    probe = source.sh(f"timeout 3 bash -c 'exec 3<>/dev/tcp/{address}/{port}' && echo open", check=False)
    return "open" in probe.stdout


def app_port_probe(lab, name: str, prober: str) -> str | None:
    """None if `prober` cannot reach gunicorn on `name` (bypassing nginx), else why.
    Controls first, so that "unreachable" cannot come from a broken probe:
    cgroup v2 is there for systemd's BPF filter, gunicorn listens on
    127.0.0.1:8000 (LISTEN_ADDRESS) and answers there, and nginx on the same
    host answers `prober`."""
    web, source = lab.hosts[name], lab.hosts[prober]
    mount = cgroup2_mount(web)
    assert mount, f"{name} has no cgroup v2 hierarchy: systemd cannot enforce IPAddressDeny, the app port would be open"
    binds = {line.split()[3] for line in web.sh("ss -Hltn").stdout.splitlines()}
    app_binds = {b for b in binds if b.rsplit(":", 1)[-1] == "8000"}
    assert app_binds == {"127.0.0.1:8000"}, f"gunicorn should listen on 127.0.0.1:8000 only, listens on {app_binds}"
    local = ssh(lab, name, "timeout 3 bash -c 'exec 3<>/dev/tcp/127.0.0.1/8000' && echo open")
    assert "open" in local.stdout, f"control: the app port is not reachable on {name}'s loopback: {local.stderr}"
    assert reachable(source, web.address, 443), f"control: {name}'s nginx (443) is not reachable from {prober}: the probe is broken"
    if reachable(source, web.address, 8000):
        props = web.sh("systemctl show chat -p IPAddressDeny -p IPAddressAllow").stdout.split()
        return f"{name}:8000 (gunicorn, bypassing nginx) is reachable from {prober} (cgroup v2 at {mount}; {props})"
    return None


@pytest.mark.parametrize("name, prober", [("web1", "web2"), ("web2", "web1"), ("web1", "data")])
def test_app_port_is_not_reachable_from_other_hosts(lab, deployed, name, prober):
    """Only nginx on the same host may reach gunicorn: it listens on loopback
    (LISTEN_ADDRESS=127.0.0.1), and the chat unit's IP filter (IPAddressDeny=any
    plus IPAddressAllow of loopback, the database and Redis) is a second fence.
    Proven by connecting from the other web host and from the data host (which
    the filter must allow for PostgreSQL and Redis), beside the controls."""
    problem = app_port_probe(lab, name, prober)
    assert problem is None, problem
    props = lab.hosts[name].sh("systemctl show chat -p IPAddressDeny -p IPAddressAllow").stdout
    deny = next((line for line in props.splitlines() if line.startswith("IPAddressDeny=")), "")
    assert {"0.0.0.0/0", "::/0"} <= set(deny.split("=", 1)[-1].split()), props
    assert f"{lab.hosts['data'].address}/32" in props and "127.0.0.0/8" in props, props


def test_a_public_port_other_than_443_reaches_the_app_with_its_port(lab, deployed):
    """Users who reach nginx on another port (a NAT, :8443) send it in Host and
    Origin; nginx must pass the Host on as sent ($http_host, not $host, which
    drops the port), or the websocket Origin check (scheme, host and port)
    refuses the site's own page. A logged-in user's handshake is accepted, and
    the same with a foreign port in the Origin is refused (control)."""
    public = f"{DOMAIN}:8443"
    ep = Endpoint(lab.hosts["web1"].https_url, public, https_proxy=False, insecure=True)
    user = chat_client.new_user(ep)
    room = chat_client.create_room(user)
    with ep.websocket(f"/ws/rooms/{room}/", user.cookies) as ws:
        chat_client.send(ws, "through port 8443")
        assert chat_client.wait_for_text(ws, "through port 8443")
    with pytest.raises(Exception) as refused:
        ep.websocket(f"/ws/rooms/{room}/", user.cookies, origin=f"https://{DOMAIN}:9443").close()
    assert "403" in str(refused.value), refused.value


def test_rolling_redeploy_keeps_clients(lab, source, deployed):
    """A new release while clients are connected: one web host restarts at a
    time, never both; clients reconnect and miss no message."""
    one, two = endpoint(lab, "web1"), endpoint(lab, "web2")
    owner = chat_client.new_user(one)
    room = chat_client.create_room(owner)
    path = f"/ws/rooms/{room}/"
    stop, sending = threading.Event(), threading.Event()
    followers = [Follower("via-web1", one, chat_client.new_user(one), path, stop),
                 Follower("via-web2", two, chat_client.new_user(two), path, stop)]
    prober = Prober({"web1": one, "web2": two}, stop)
    sender = Sender([one, two], owner, path, sending)
    for thread in (*followers, prober, sender):
        thread.start()

    # A new release: same lock, different tree (so a new release directory).
    (source / "RELEASE").write_text(f"rolling redeploy test {time.time()}\n")
    old = lab.hosts["web1"].sh("readlink /srv/chat/current").stdout.strip()
    try:
        time.sleep(2)
        run = lab.playbook(source)
        TIMINGS["rolling redeploy"] = run.seconds
        time.sleep(2)
    finally:
        sending.set()
        sender.join(15)
    try:
        assert run.returncode == 0, f"{run.output[-8000:]}\n{host_logs(lab)}"
        for name in ("web1", "web2"):
            current = lab.hosts[name].sh("readlink /srv/chat/current").stdout.strip()
            assert current != old and current.startswith("/srv/chat/releases/"), (name, old, current)
        assert not sender.is_alive(), (
            f"the sender did not stop ({len(sender.confirmed)} confirmed):\n{stacks()}"
        )
        assert len(sender.confirmed) >= 10, (
            f"only {len(sender.confirmed)} messages got through ({sender.failures} failures)"
        )
        # Every confirmed message reaches both clients, live or replayed after a reconnect.
        deadline = time.monotonic() + 20
        while True:
            missing = {f.name: [t for t in sender.confirmed if t not in f.seen_text()] for f in followers}
            if not any(missing.values()) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if any(missing.values()):
            lost = {t for v in missing.values() for t in v}
            raise AssertionError(
                f"missed: { {k: v[:5] + ['...'] + v[-2:] for k, v in missing.items() if v} }\n"
                + "\n".join(f.report() for f in followers) + f"\nnow {time.monotonic():.1f} = {time.strftime('%H:%M:%S')}; sender:\n"
                + "\n".join(line for line in sender.log if line.split()[1] in lost)
                + f"\n{host_logs(lab, lines=150)}"
            )
        # Both hosts restarted (each client lost its connection and came back),
        # one after the other: some host answered at every probe.
        for follower in followers:
            assert follower.connects >= 2, f"{follower.name} never reconnected: was its host restarted?"
        assert prober.down_windows("web1") >= 1 and prober.down_windows("web2") >= 1, "a host never went down"
        assert not prober.all_down(), f"both hosts were down at once ({len(prober.all_down())} probes)"
    finally:
        stop.set()
        for thread in (*followers, prober):
            thread.join(5)
