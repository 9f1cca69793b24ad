"""chat.service as systemd runs it, and nginx behind a TLS-terminating load
balancer (issue [K] item 7), on the three-host lab of test_ansible_deploy.py.

- `Type=notify`: gunicorn's master sends READY=1 (with STATUS=...) through
  $NOTIFY_SOCKET once it listens; systemd shows that status.
- The sandbox: `systemd-analyze security chat.service` on each web host (a
  Debian 12 and a Debian 13 systemd) reports an exposure of 2.5 or lower; the
  same unit without its sandbox lines scores above that (the reading can fail).
- A load balancer (tests/vm/lb.py, a container on the lab network) terminates
  TLS and forwards to web1's port 80 with X-Forwarded-Proto: https: served,
  no redirect loop, the whole black-box contract passes through it. The same
  header from another host (not in nginx_trusted_proxies) is ignored: a
  redirect to https, and its X-Forwarded-For does not name the client.
"""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.contract.verify import Endpoint
from tests.harness import chat_client
from tests.harness.services import REPO
from tests.vm.conftest import host_logs
from tests.vm.lab import DOMAIN

pytestmark = pytest.mark.docker

EXPOSURE_LIMIT = 2.5
SANDBOX = re.compile(r"^(NoNewPrivileges|CapabilityBoundingSet|AmbientCapabilities|Private\w+|DevicePolicy|Protect\w+|ProcSubset|"
                     r"Restrict\w+|LockPersonality|SystemCall\w+|RemoveIPC|KeyringMode|UMask|IPAddress\w+)=")


def exposure(text: str) -> float:
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", text)
    assert match, text[-2000:]
    return float(match.group(1))


@pytest.mark.parametrize("name", ["web1", "web2"])
def test_chat_service_is_type_notify_and_gunicorn_said_ready(lab, deployed, name):
    host = lab.hosts[name]
    props = dict(line.split("=", 1) for line in host.sh(
        "systemctl show chat -p Type -p NotifyAccess -p StatusText -p ActiveState").stdout.splitlines() if "=" in line)
    assert props["Type"] == "notify" and props["NotifyAccess"] == "main", props
    assert props["ActiveState"] == "active", props
    # STATUS= arrives with READY=1 from gunicorn's arbiter (gunicorn/arbiter.py).
    assert "Gunicorn arbiter booted" in props["StatusText"], props


@pytest.mark.parametrize("name", ["web1", "web2"])
def test_systemd_analyze_security_exposure_is_low(lab, deployed, name):
    host = lab.hosts[name]
    r = host.sh("systemd-analyze security chat.service --no-pager 2>&1", check=False)
    score = exposure(r.stdout + r.stderr)
    version = host.sh("systemctl --version | head -1").stdout.strip()
    print(f"\n{name} ({version}): systemd-analyze security chat.service -> {score}")
    assert score <= EXPOSURE_LIMIT, f"{name}: exposure {score} > {EXPOSURE_LIMIT}\n{r.stdout[-4000:]}"
    # Control: the same unit without the sandbox lines scores high on the same systemd.
    unit = host.sh("cat /etc/systemd/system/chat.service").stdout
    bare = "\n".join(line for line in unit.splitlines() if not SANDBOX.match(line))
    host.sh(f"mkdir -p /tmp/analyze && cat > /tmp/analyze/bare-chat.service <<'EOF'\n{bare}\nEOF")
    r = host.sh("systemd-analyze security --offline=yes /tmp/analyze/bare-chat.service 2>&1", check=False)
    assert exposure(r.stdout + r.stderr) > EXPOSURE_LIMIT + 2, r.stdout[-3000:]


def test_the_contract_through_a_tls_terminating_load_balancer(lab, deployed):
    """The black-box verifier through the load balancer (TLS there, plain
    HTTP to web1:80): no redirect loop, secure cookies, wss:// URLs, a
    websocket through the balancer, the second user on web2's own nginx."""
    cmd = [sys.executable, "-m", "tests.contract.verify", lab.lb.https_url, "--host", DOMAIN, "--insecure",
           "--second-url", lab.hosts["web2"].https_url,
           # plain HTTP from an address that is not the balancer must be redirected
           "--http-url", lab.hosts["web1"].http_url]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}\n{host_logs(lab)}\n{lab_lb_logs(lab)}"


def lab_lb_logs(lab) -> str:
    r = subprocess.run(["docker", "logs", "--tail", "50", lab.lb.container], capture_output=True, text=True)
    return r.stdout + r.stderr


def fetch(lab, from_host: str, path: str, headers: dict) -> tuple[int, str]:
    """GET web1:80 from another machine on the lab network, headers as given."""
    script = (
        "import http.client,sys\n"
        "c=http.client.HTTPConnection('web1',80,timeout=10)\n"
        f"c.request('GET',{path!r},headers={headers!r})\n"
        "r=c.getresponse();b=r.read().decode(errors='replace')\n"
        "print(r.status);print(r.getheader('Location') or '');print(b[:20000])\n")
    r = lab.hosts[from_host].sh(f"python3 - <<'EOF'\n{script}EOF", check=False)
    status, location, *body = r.stdout.split("\n")
    return int(status), location + "\n" + "\n".join(body)


def lb_fetch(lab, path: str, headers: dict) -> tuple[int, str]:
    script = (
        "import http.client\n"
        "c=http.client.HTTPConnection('web1',80,timeout=10)\n"
        f"c.request('GET',{path!r},headers={headers!r})\n"
        "r=c.getresponse();b=r.read().decode(errors='replace')\n"
        "print(r.status);print(r.getheader('Location') or '');print(b[:20000])\n")
    r = subprocess.run(["docker", "exec", "-i", lab.lb.container, "python3", "-"], input=script, capture_output=True, text=True)
    status, location, *body = r.stdout.split("\n")
    return int(status), location + "\n" + "\n".join(body)


def test_forwarded_proto_is_trusted_only_from_the_load_balancer(lab, deployed):
    https = {"Host": DOMAIN, "X-Forwarded-Proto": "https"}
    # From the load balancer's address: served (200), the page knows it is https.
    status, body = lb_fetch(lab, "/accounts/login/", https)
    assert status == 200, body[:500]
    # The balancer must say https: without the header, a redirect.
    status, body = lb_fetch(lab, "/accounts/login/", {"Host": DOMAIN})
    assert status == 301 and body.startswith(f"https://{DOMAIN}/accounts/login/"), body[:300]
    # From another host (not a trusted proxy) the same header is ignored.
    status, body = fetch(lab, "data", "/accounts/login/", https)
    assert status == 301 and body.startswith(f"https://{DOMAIN}/accounts/login/"), body[:300]
    status, _ = fetch(lab, "data", "/static/chat/chat.css", https)
    assert status == 301


def test_the_client_address_comes_from_the_balancer_only(lab, deployed):
    """nginx passes one X-Forwarded-For to gunicorn: the balancer's claim when
    the balancer connected, the TCP peer otherwise (a client's own header is
    ignored). Read back from nginx's access log on web1."""
    web1 = lab.hosts["web1"]
    marker = "/accounts/login/?xff-check"
    lb_fetch(lab, marker + "=lb", {"Host": DOMAIN, "X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.7"})
    fetch(lab, "data", marker + "=data", {"Host": DOMAIN, "X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.8"})
    log = web1.sh("grep 'xff-check' /var/log/nginx/access.log | tail -2").stdout
    lines = {("lb" if "=lb" in line else "data"): line.split()[0] for line in log.splitlines()}
    assert lines.get("lb") == "203.0.113.7", log
    assert lines.get("data") == lab.hosts["data"].address, log


def test_a_websocket_through_the_load_balancer(lab, deployed):
    lb = Endpoint(lab.lb.https_url, DOMAIN, https_proxy=False, insecure=True)
    direct = Endpoint(lab.hosts["web2"].https_url, DOMAIN, https_proxy=False, insecure=True)
    alice, bob = chat_client.new_user(lb), chat_client.new_user(direct)
    room = chat_client.create_room(alice)
    path = f"/ws/rooms/{room}/"
    with lb.websocket(path, alice.cookies) as ws1, direct.websocket(path, bob.cookies) as ws2:
        chat_client.send(ws1, "through the balancer")
        chat_client.wait_for_text(ws2, "through the balancer")
        chat_client.send(ws2, "back through it")
        chat_client.wait_for_text(ws1, "back through it")
