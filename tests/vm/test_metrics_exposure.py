"""/metrics on the VMs: only on each web host's private address, only with the token.

The lab deploys with CHAT_METRICS_TOKEN (tests/vm/lab.py), so every web host's
nginx listens on its private address, port 9100 (`chat_metrics_port`), for
/metrics and passes the bearer token on to the app; the public ports (80, 443)
forward /metrics without the Authorization header, so there it is the app's
404, exactly like an unknown path. Probed as a Prometheus server on the lab
network would (from the data host), and from outside (this machine, through
the ports the lab publishes on 127.0.0.1), each refusal beside its positive
control.
"""
from __future__ import annotations

import json

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.contract.verify import Endpoint
from tests.vm.lab import DOMAIN

pytestmark = pytest.mark.docker

PORT = 9100


def private_get(lab, from_host: str, to_host: str, path: str, headers: dict, port: int = PORT) -> tuple[int, str]:
    """GET http://<to_host's private address>:port/path from another lab host."""
    address = lab.hosts[to_host].address
    script = (
        "import http.client,json\n"
        "try:\n"
        f"    c=http.client.HTTPConnection({address!r},{port},timeout=10)\n"
        f"    c.request('GET',{path!r},headers={headers!r})\n"
        "    r=c.getresponse();print(json.dumps([r.status,r.read().decode(errors='replace')]))\n"
        "except OSError as e:\n"
        "    print(json.dumps([0,type(e).__name__]))\n")
    r = lab.hosts[from_host].sh(f"python3 - <<'EOF'\n{script}EOF", check=False)
    status, body = json.loads(r.stdout.strip().splitlines()[-1])
    return status, body


def names_and_pids(text: str) -> tuple[set[str], set[str]]:
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    return {s.name for s in samples}, {s.labels["pid"] for s in samples if s.name == "process_resident_memory_bytes"}


@pytest.mark.parametrize("name", ["web1", "web2"])
def test_metrics_on_the_private_address_with_the_token(lab, deployed, name):
    token = lab.secrets["CHAT_METRICS_TOKEN"]
    bearer = {"Authorization": f"Bearer {token}"}
    # A Prometheus on the private network (the data host), calling the address: 200, both workers summed.
    status, body = private_get(lab, "data", name, "/metrics", bearer)
    assert status == 200, (status, body[:300])
    names, pids = names_and_pids(body)
    assert {"chat_websocket_connections", "chat_deliveries_total", "chat_websocket_handshakes_total"} <= names
    workers = lab.hosts[name].sh("pgrep -P $(systemctl show chat -p MainPID --value)").stdout.split()
    assert pids == set(workers) and len(pids) == 2, (pids, workers)
    # Without the token, or with a wrong one: no metrics.
    for headers in ({}, {"Authorization": f"Bearer {token[:-1]}x"}, {"Authorization": f"Basic {token}"}):
        status, body = private_get(lab, "data", name, "/metrics", headers)
        assert status in (400, 404) and "chat_" not in body, (headers, status)
    # Nothing else on that listener.
    for path in ("/", "/accounts/login/", "/healthz"):
        assert private_get(lab, "data", name, path, bearer)[0] == 404, path
    # It listens on the private address only.
    listening = {line.split()[3] for line in lab.hosts[name].sh("ss -Hltn").stdout.splitlines()}
    assert {b for b in listening if b.endswith(f":{PORT}")} == {f"{lab.hosts[name].address}:{PORT}"}, listening


@pytest.mark.parametrize("name", ["web1", "web2"])
def test_metrics_never_from_the_public_ports(lab, deployed, name):
    """Through nginx's public ports (what the outside reaches), the token
    counts for nothing: /metrics is the app's 404 page, as /no-such-page is."""
    token = lab.secrets["CHAT_METRICS_TOKEN"]
    public = Endpoint(lab.hosts[name].https_url, DOMAIN, https_proxy=False, insecure=True)
    with public.client() as client:
        for headers in ({"Authorization": f"Bearer {token}"}, {}):
            got = client.get("/metrics", headers={"Host": DOMAIN, **headers})
            unknown = client.get("/no-such-page", headers={"Host": DOMAIN, **headers})
            assert (got.status_code, got.text) == (unknown.status_code, unknown.text) and got.status_code == 404, headers
            assert "chat_websocket" not in got.text
        plain = client.get(f"http://127.0.0.1:{lab.hosts[name].ports[80]}/metrics",
                           headers={"Host": DOMAIN, "Authorization": f"Bearer {token}"})
        assert plain.status_code == 301, plain.status_code  # plain HTTP only redirects
    # The metrics port is not published: from outside there is no way to it.
    assert PORT not in lab.hosts[name].ports
    # Control: the same token through the private listener works (the refusals above are not a broken token).
    assert private_get(lab, "web2" if name == "web1" else "web1", name, "/metrics",
                       {"Authorization": f"Bearer {token}"})[0] == 200
